"""`chimera profile`: measure a server, fit the engine model, write a profile (or check one); see docs/profile.md."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from chimera.cli.common import console, err, fail, failing_on, progress


def profile_cmd(
    base_url: Optional[str] = typer.Option(None, "--base-url", help="The server's OpenAI base URL (/v1 is appended if missing)."),
    model: Optional[str] = typer.Option(None, "--model", help="Served model name to measure (as /v1/models lists it)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Profile YAML to write (use it as `profile_file:` in a cluster file)."),
    refit: Optional[Path] = typer.Option(None, "--refit", help="Fit again from the measurements stored in this profile (no server needed); write --out."),
    check: Optional[str] = typer.Option(None, "--check", help="Instead of (or besides) fitting: compare fresh measurements with a profile's predictions (a profile YAML, or a catalogue MODEL@GPU)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the profile (default: --model)."),
    gpu: str = typer.Option("measured", "--gpu", help="A label for the machine (free text, not a catalogue GPU)."),
    api: str = typer.Option("completions", "--api", help="completions | chat: the endpoint the requests use."),
    concurrency: str = typer.Option("1,2,4,8,16,32", "--concurrency", help="Decode waves: concurrent requests per wave."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="max_tokens of each decode request (ignore_eos)."),
    rounds: int = typer.Option(2, "--rounds", help="Repeats of every point (medians are fitted)."),
    extra_waves: int = typer.Option(2, "--extra-waves", help="More waves for a concurrency whose waves disagree by over 35%."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", help="Prompt length of the decode waves."),
    prefill_lengths: Optional[str] = typer.Option(None, "--prefill-lengths", help="Prompt lengths of the TTFT points (default 16,64,256,512,1024,1536 within max_model_len)."),
    long_prompt_tokens: Optional[int] = typer.Option(None, "--long-prompt-tokens", help="Prompt of the long-context decode waves (default min(1024, room in max_model_len); 0: none)."),
    long_concurrency: str = typer.Option("1,8", "--long-concurrency", help="Concurrency of the long-context decode waves."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", help="The server's batch limit, if known (else measured when requests queue, or 256)."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens", help="The server's token budget per step (default 8192; vLLM CPU: 2048)."),
    kv_capacity_tokens: Optional[int] = typer.Option(None, "--kv-capacity-tokens", help="KV cache size in tokens, if known (else from vLLM metrics)."),
    params_b: Optional[float] = typer.Option(None, "--params-b", help="Parameters (billions), if known: ranks model sizes."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CHIMERA_API_KEY", help="Bearer key for the server."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds per request."),
    metrics: bool = typer.Option(True, "--metrics/--no-metrics", help="Scrape vLLM /metrics during the waves."),
    tpot_source: str = typer.Option("auto", "--tpot-source", help="auto | engine | client: decode TPOT from the server's own inter-token latency metric (vLLM; auto uses it when exported) or from the streams' timing."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompts."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measurements and the fit as JSON."),
) -> None:
    """Measure a running OpenAI-compatible server, fit the engine model to it, print the fit's error per point and
    write a profile a cluster file can use (`profile_file: PROFILE.yaml`). Exits 2 if the server cannot be
    measured; a poor fit only warns. See docs/profile.md.

    Example: chimera profile --base-url http://127.0.0.1:8000 --model my-model --out out/my-model.yaml
    Check it later: chimera profile --base-url http://127.0.0.1:8000 --model my-model --check out/my-model.yaml
    """
    from chimera.perfmodel.profiles import ClusterError
    from chimera.perfmodel.profiles import profile as load_profile
    from chimera.profiling import MeasureError, ProfileConfig
    from chimera.profiling.document import ProfileOverrides, stored_measurements

    if out is None and check is None:
        fail("give --out PROFILE.yaml (fit and write) and/or --check PROFILE.yaml (compare with an existing one)")
    given = ProfileOverrides(name, gpu, max_num_seqs, max_num_batched_tokens, kv_capacity_tokens, params_b)
    if refit is not None:
        if out is None:
            fail("--refit needs --out")
        with failing_on(MeasureError, strip=False):
            meas, stored = stored_measurements(refit)
        return write_fitted(meas, out, json_out, given.filled_from(stored),
                            f"{meas.model} at {meas.base_url} (refit of {refit})")
    if base_url is None or model is None:
        fail("give --base-url and --model (or --refit PROFILE.yaml)")
    with failing_on(ValueError, ClusterError, strip=False):
        old = load_profile(check) if check is not None else None
        cfg = ProfileConfig(base_url=base_url, model=model, api=api, api_key=api_key,
                            concurrency=int_list(concurrency, "--concurrency"), decode_tokens=decode_tokens,
                            rounds=rounds, prompt_tokens=prompt_tokens,
                            prefill_lengths=int_list(prefill_lengths, "--prefill-lengths") if prefill_lengths else None,
                            long_prompt_tokens=long_prompt_tokens,
                            long_concurrency=int_list(long_concurrency, "--long-concurrency"), metrics=metrics,
                            timeout_s=timeout, seed=seed, extra_waves=extra_waves, tpot_source=tpot_source)
        if tpot_source == "engine" and not metrics:
            fail("--tpot-source engine reads the server's /metrics: drop --no-metrics")
    meas = measure_server(cfg)
    if old is not None:
        show_check(old, meas, f"{model} at {cfg.v1}", check)
        if out is None:
            console.print(f"{meas.wall_s:.0f} s of measuring")
            return
    write_fitted(meas, out, json_out, given, f"{model} at {cfg.v1}")


def int_list(text: str, flag: str) -> tuple[int, ...]:
    """'1,2,4' → (1, 2, 4); anything but integers ≥ 1 fails naming the flag."""
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{flag} must be comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        fail(f"{flag} must list integers ≥ 1, got {text!r}")
    return vals


def measure_server(cfg):
    """Measure the server of `cfg` under a progress bar; a server that cannot be measured exits 2."""
    from chimera.profiling import MeasureError, measure

    with progress() as prog:
        bar = prog.add_task(f"profiling {cfg.model}", total=None)

        def on_progress(what: str, done: int, total: int) -> None:
            prog.update(bar, description=what, completed=done, total=total)

        try:
            return measure(cfg, on_progress)
        except MeasureError as e:
            fail(f"measurement failed: {e}")


def show_check(old, meas, title: str, check: str) -> None:
    """Fresh measurements against the profile `check` names: the table, and a warning per point off by > 15%."""
    from chimera.profiling.document import check_rows
    from chimera.profiling.fit import poorly_fitted

    rows = check_rows(old, meas)
    console.print(profile_table(rows, meas.decode, f"{title}: measured now vs {check}", "profile (ms)"))
    for r in poorly_fitted(rows):
        err.print(f"[yellow]warning:[/] {decode_point(r)}: {check} predicts {100 * r.error:+.1f}% (more than 15% off)")


def write_fitted(meas, out: Path, json_out: Optional[Path], overrides, title: str) -> None:
    """Fit and write the profile (and JSON); print the fit per point, its formula, notes and warnings."""
    from chimera.profiling.document import ProfileBuildError, fit_and_write, fit_formula

    with failing_on(ProfileBuildError, strip=False):
        res, path = fit_and_write(meas, out, overrides, json_out)
    console.print(profile_table(res.rows, meas.decode, f"{title}: measured vs fitted"))
    console.print(fit_formula(res.fit))
    for note in res.notes:
        console.print(f"  {note}")
    for r in res.poor:
        err.print(f"[yellow]warning:[/] {decode_point(r)} fitted {100 * r.error:+.1f}% off (more than 15%)")
    console.print(f"wrote {path} ({meas.wall_s:.0f} s of measuring). Use it: models: [{{profile_file: {path}, "
                  f"name: {res.spec.name}}}] in a cluster file, or chimera emulate --profile {path}")


def decode_point(r) -> str:
    """'decode c=8' or 'decode c=8 (long prompts)' for a fit row."""
    return f"decode c={r.x}{' (long prompts)' if r.kind == 'decode-long' else ''}"


def profile_table(rows: list, decode: list, title: str, fitted_col: str = "fitted (ms)") -> Table:
    """Measured against fitted (or a profile's) time per point: TPOT per decode wave, TTFT per prompt length."""
    t = Table(title=title)
    for col in ("point", "batch", "KV tokens", "measured (ms)", "min–max (ms)", fitted_col, "error", "tok/s"):
        t.add_column(col, justify="left" if col == "point" else "right")
    tok_s = {(p.label, p.concurrency): p.tok_s for p in decode}
    for r in rows:
        if r.kind == "prefill":
            label, batch, kv, rate = f"TTFT, {r.x}-token prompt", "", "", ""
        else:
            label = f"TPOT c={r.x}" + (", long prompts" if r.kind == "decode-long" else "") + (
                "" if r.steady else " (bursty: makespan)")
            batch = f"{r.n:.0f}" if abs(r.n - round(r.n)) < 0.05 else f"{r.n:.1f}"
            kv, rate = f"{r.ctx_tokens:,.0f}", f"{tok_s.get((r.kind, r.x), float('nan')):,.0f}"
        e = f"{100 * r.error:+.1f}%"
        t.add_row(label, batch, kv, f"{1e3 * r.measured_s:.2f}", f"{1e3 * r.spread[0]:.2f}–{1e3 * r.spread[1]:.2f}",
                  f"{1e3 * r.fitted_s:.2f}", f"[bold red]{e}[/]" if r.kind != "prefill" and abs(r.error) > 0.15 else e,
                  rate)
    return t
