"""``secateurs explain DIR``: the per-block table of a pruned folder (importance, cost, assigned ratio, action)."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub):
    p = sub.add_parser("explain", help="per-block importance, cost and assigned ratio of a pruned folder (tell)")
    p.add_argument("folder", help="output folder of `secateurs prune` (holds result.json)")
    p.set_defaults(func=run)


def load_result(folder: str | Path) -> dict:
    from ..errors import UserError

    path = Path(folder) / "result.json"
    try:
        result = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{path} not found: give the output folder of a finished `secateurs prune` run") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    from ..result import check_format

    check_format(result, path)
    if not (result.get("method_details") or {}).get("blocks"):
        raise UserError(f"{path} has no per-block details (method {result.get('method')!r}); "
                        "explain reads runs of methods that record them (tell)")
    return result


def format_table(result: dict) -> str:
    d = result["method_details"]
    lines = [
        f"{result['method']} on {result['model']}: ratio {result['ratio_achieved']:.4f}"
        f" (budget: {', '.join(f'{k} {v}' for k, v in d.get('budget', {}).items() if v is not None) or '?'})",
    ]
    if "predicted_speedup" in d:
        lines[0] += f", predicted prefill speedup {d['predicted_speedup']:.3f}"
    for r in d.get("speedup_rounds", []):
        lines.append(f"  speedup round: cost-model goal {r['cost_model_goal']:.3f}, predicted {r['predicted']:.3f}, "
                     f"measured {r['speedup']:.3f} ({r['dense_ms']:.1f} -> {r['pruned_ms']:.1f} ms, prompt {r['prompt_len']})")
    cm = d.get("cost_model")
    if cm:
        per = ", ".join(f"{k} {v * 1e6:.3f}" for k, v in cm["ms_per_param"].items())
        lines.append(f"  cost model ({cm['device']}, prompt {cm['prompt_len']}, dense {cm['dense_ms']:.1f} ms): "
                     f"ms saved per million params removed: {per}")
    head = f"{'block':<8} {'params':>10} {'importance':>11} {'load':>6} {'cost_ms':>8} {'assigned':>9} {'removed':>8}  action"
    lines += ["", head, "-" * len(head)]
    for b in d["blocks"]:
        lines.append(f"{b['block']:<8} {b['params']:>10,} {b['importance']:>11.4f} {b['load_weight']:>6.2f} "
                     f"{b['cost_ms_whole']:>8.2f} {b['ratio_assigned']:>9.3f} {b['units_removed']:>8.3f}  {b['action']}")
    lines.append("")
    lines.append("importance: transfer entropy (nats) from the block to the final stream given its input; load: "
                 "relative share of the budget; cost_ms: prefill time saved if removed whole; assigned: block ratio "
                 "(1 = removed whole); removed: fraction of its heads / channels removed")
    return "\n".join(lines)


def run(args):
    print(format_table(load_result(args.folder)))
