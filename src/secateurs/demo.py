"""`make demo`: the project at its best on a CPU in a few minutes. SmolLM2-135M is pruned by the method and ratio
in ``CHOICE`` (the best measured quality per speed: benchmarks/results/tradeoff-smollm2-135m.md), then
measured against the dense model: parameters, held-out perplexity, and prefill and decode speed side by side in
this process (the pruned folder gets ``bench.json`` like ``secateurs bench --json`` writes), the same inside
llama.cpp on q8_0 GGUF exports of both (``bench-gguf.json``), with one greedy continuation from each model.

The run is written to runs/demo-<method>-<ratio>/ (resumable); a second ``make demo`` reuses the finished run and
its speed measurement (delete the folder to redo both).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# The one-line choice: method and target ratio, the best quality per measured speed on SmolLM2 in the
# trade-off benchmark (benchmarks/tradeoff.py; README).
CHOICE = dict(method="flap", ratio=0.15)
# The trade-off's calibration (16 rows of 256 tokens of wiki) and the held-out rows every command uses by default.
SETTINGS = dict(model="smollm2-135m", calib="wiki", nsamples=16, seqlen=256, seed=0, eval="wiki:test")
SPEED = dict(prompt_len=256, decode_tokens=32, warmup=1, reps=5, seed=0, clock="cpu")  # clock: eval.bench
GGUF_TYPE = "q8_0"  # what a llama.cpp / ollama user would run; both files exported with the same type
PROMPT = "The capital of France is"
SAMPLE_TOKENS = 16


def out_folder(method: str, ratio: float) -> Path:
    return Path("runs") / f"demo-{method}-{ratio:g}"


def continuation(model, tok, n: int = SAMPLE_TOKENS) -> str:
    import torch

    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def prune_once(out: Path, method: str, ratio: float) -> dict:
    """The finished run in ``out`` when its settings are these, else a new (or resumed) run."""
    from .pipeline import PruneSettings, run_prune

    s = PruneSettings(method=method, ratio=ratio, **SETTINGS)
    if (out / "result.json").exists():
        r = json.loads((out / "result.json").read_text())
        mine = {k: v for k, v in r.get("settings", {}).items() if k != "options"}
        # as the pipeline records them: no engine key for a run without --engine
        wanted = {k: v for k, v in vars(s).items() if k != "options" and not (k == "engine" and not v)}
        if mine == wanted:
            print(f"(reusing the finished run in {out}; delete it to recompute)", flush=True)
            return r
        print(f"({out} holds a run with other settings: pruning again)", flush=True)
    r = run_prune(s, out, overwrite=True)
    r.pop("_model"), r.pop("_tokenizer")
    return r


def measure_speed(out: Path, model_name: str) -> dict:
    """Prefill and decode speed of the pruned folder against the dense model, alternating in this process;
    kept in ``out/bench.json`` and reused."""
    from .eval.bench import BenchSettings, bench
    from .result import versions
    from .files import atomic_write_text

    path = out / "bench.json"
    if path.exists():
        b = json.loads(path.read_text())
        if {k: b["settings"].get(k) for k in SPEED} == SPEED:
            print(f"(reusing the speed measurement in {path})", flush=True)
            return b
    print("measuring speed: dense and pruned in turn, "
          f"{SPEED['warmup']} warm-up + {SPEED['reps']} timed rounds ...", flush=True)
    b = bench(str(out), model_name, BenchSettings(**SPEED), memory=False)
    b["versions"] = versions()
    atomic_write_text(path, json.dumps(b, indent=1))
    return b


def measure_llamacpp(out: Path, model_name: str) -> dict | None:
    """The same comparison inside llama.cpp: dense and pruned exported to GGUF (``GGUF_TYPE``), prompt and
    generation speed side by side in one process (``secateurs bench FILE.gguf --against DENSE.gguf``); kept in
    ``out/bench-gguf.json`` and reused. None (with the reason printed) when llama.cpp is not installed."""
    from .errors import UserError
    from .llamacpp.bench import LlamaBenchSettings, bench
    from .llamacpp.binding import default_threads
    from .export.gguf import export_model
    from .result import versions
    from .files import atomic_write_text

    path = out / "bench-gguf.json"
    settings = dict(SPEED, type=GGUF_TYPE, threads=default_threads())  # llama.cpp's default threads
    if path.exists():
        b = json.loads(path.read_text())
        if b.get("demo_settings") == settings:
            print(f"(reusing the llama.cpp measurement in {path})", flush=True)
            return b
    files = {"dense": out / f"dense-{GGUF_TYPE}.gguf", "pruned": out / f"model-{GGUF_TYPE}.gguf"}
    try:
        for which, ref in (("dense", model_name), ("pruned", str(out))):
            if not files[which].exists():
                print(f"exporting the {which} model to GGUF ({GGUF_TYPE}) ...", flush=True)
                export_model(ref, str(files[which]), GGUF_TYPE, threads=settings["threads"], progress=False)
        print(f"measuring speed in llama.cpp ({plural(settings['threads'], 'thread')}): dense and pruned in turn ...", flush=True)
        b = bench(str(files["pruned"]), str(files["dense"]),
                  LlamaBenchSettings(**SPEED, threads=settings["threads"]), memory=False)
    except UserError as e:  # llama.cpp missing: the PyTorch figures still stand
        print(f"(llama.cpp measurement skipped: {e})", flush=True)
        return None
    b["demo_settings"], b["versions"] = settings, versions()
    atomic_write_text(path, json.dumps(b, indent=1))
    return b


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def main() -> int:
    from .errors import UserError
    from .eval.load import load_note
    from .eval.perplexity import rows_label
    from .sources import load_model
    from .result import held_out_label

    method, ratio = CHOICE["method"], CHOICE["ratio"]
    out = out_folder(method, ratio)
    t0 = time.time()
    print(f"secateurs demo: {SETTINGS['model']}, method {method}, target ratio {ratio}, calibration "
          f"{rows_label(SETTINGS['nsamples'], SETTINGS['seqlen'])} of {SETTINGS['calib']}\n"
          f"  = secateurs prune {SETTINGS['model']} --method {method} --ratio {ratio} --nsamples {SETTINGS['nsamples']} "
          f"--seqlen {SETTINGS['seqlen']} --out {out}\n"
          f"    secateurs bench {out} --against {SETTINGS['model']} --prompt-len {SPEED['prompt_len']} "
          f"--decode-tokens {SPEED['decode_tokens']} --warmup {SPEED['warmup']} --reps {SPEED['reps']} --no-memory",
          flush=True)
    try:
        r = prune_once(out, method, ratio)
        b = measure_speed(out, SETTINGS["model"])
        g = measure_llamacpp(out, SETTINGS["model"])
        dense, tok = load_model(SETTINGS["model"], progress=False)
        pruned, _ = load_model(str(out), progress=False)
    except UserError as e:
        print(f"secateurs: error: {e}", file=sys.stderr)
        return 2
    a, sp, ideal = b["against"], b["speedup"], b["ideal_speedup"]
    rows = [
        ("parameters", f"{r['params_before']:,}", f"{r['params_after']:,}"),
        (held_out_label(r), f"{r['ppl_test_before']:.2f}", f"{r['ppl_test_after']:.2f}"),
        (f"calib ppl ({rows_label(SETTINGS['nsamples'], SETTINGS['seqlen'])})", f"{r['ppl_calib_before']:.2f}",
         f"{r['ppl_calib_after']:.2f}"),
        (f"prefill ms ({SPEED['prompt_len']} tokens, batch 1)", f"{a['prefill_ms']:.1f}", f"{b['prefill_ms']:.1f}"),
        (f"decode tokens/s ({SPEED['decode_tokens']} tokens)", f"{a['decode_tokens_per_s']:.1f}", f"{b['decode_tokens_per_s']:.1f}"),
    ]
    w = max(len(x[0]) for x in rows)
    print(f"\n{method}: ratio achieved {r['ratio_achieved']:.4f} (target {ratio}); search {r['search_seconds']:.0f} s")
    print(f"{'':<{w}}  {'dense':>13}  {'pruned':>13}")
    for name, x, y in rows:
        print(f"{name:<{w}}  {x:>13}  {y:>13}")
    print(f"measured speedup (side by side, medians of {SPEED['reps']} rounds, {b['settings']['device']}, "
          f"{b['settings'].get('timer', 'perf_counter')}): prefill "
          f"{sp['prefill']:.2f}x, decode {sp['decode']:.2f}x (ideal from FLOPs: {ideal['prefill']:.2f}x, {ideal['decode']:.2f}x)")
    notes = [n for n in (load_note(b.get("load")), load_note(g.get("load")) if g else None) if n]
    if notes:
        print(notes[0])
    if g is not None:
        ga, gs = g["against"], g["speedup"]
        print(f"in llama.cpp ({GGUF_TYPE} GGUF, {plural(g['settings']['threads'], 'thread')}, medians of {SPEED['reps']} rounds): prompt "
              f"{ga['prompt_tokens_per_s']:.0f} -> {g['prompt_tokens_per_s']:.0f} tokens/s ({gs['prefill']:.2f}x), "
              f"generation {ga['decode_tokens_per_s']:.1f} -> {g['decode_tokens_per_s']:.1f} tokens/s ({gs['decode']:.2f}x); "
              f"files {ga['file_bytes'] / 2**20:.0f} -> {g['file_bytes'] / 2**20:.0f} MiB")
    print(f"\n{PROMPT!r} ... greedy, {SAMPLE_TOKENS} tokens:\n  dense:  {continuation(dense, tok)}\n"
          f"  pruned: {continuation(pruned, tok)}")
    rise = r["ppl_test_after"] / r["ppl_test_before"] - 1
    speed = (f"the speed figures were taken on a busy machine and say little (rerun `make demo` on a quiet one: "
             f"delete {out / 'bench.json'} first)" if notes else
             f"on this machine the pruned model reads a prompt {sp['prefill']:.2f}x and writes {sp['decode']:.2f}x as "
             "fast as the dense one")
    print(f"\nWhat it means: {r['ratio_achieved']:.0%} of the parameters are gone, without retraining; {speed}, and "
          f"its held-out perplexity (lower is better) is {rise:.0%} higher" + ("." if notes else ": faster, measurably worse."))
    print(f"folder: {out} (secateurs eval / bench / report accept it); demo took {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
