"""Any OpenAI-compatible server (LiteLLM, TGI, SGLang's OpenAI API, a hosted endpoint): the body as the client sent it,
no load gauges."""

from chimera.backends.kinds.base import BackendKind, register_backend_kind


@register_backend_kind("openai")
class OpenAIBackend(BackendKind):
    """Nothing beyond the OpenAI API: the gateway's own in-flight counts are its only load signal."""
