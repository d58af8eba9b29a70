"""``secateurs explain DIR``: the per-block table of a pruned folder (tell): measured responses, importance, cost,
the chosen option and why."""
from __future__ import annotations

import json
from pathlib import Path

from ..defaults import KEEP_HEADS_ENGINES


def register(sub):
    p = sub.add_parser("explain", help="per block of a tell run: measured response, importance, cost, chosen option and why",
                       fill=add_arguments)
    p.set_defaults(func=run)


def add_arguments(p):
    p.add_argument("folder", help="output folder of `secateurs prune` (holds result.json)")


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


def _num(v, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"


def format_table(result: dict) -> str:
    d = result["method_details"]
    lines = [
        f"{result['method']} on {result['model']}: ratio {result['ratio_achieved']:.4f}"
        f" (budget: {', '.join(f'{k} {v}' for k, v in d.get('budget', {}).items() if v is not None) or '?'})",
    ]
    if d.get("predicted_speedup") is not None:
        lines[0] += f", predicted prefill speedup {d['predicted_speedup']:.3f}"
    engine = (result.get("settings") or {}).get("engine")
    if engine in KEEP_HEADS_ENGINES:
        lines.append(f"  --engine {engine}: every query head kept, attention blocks kept or removed whole"
                     + ("" if d.get("allocation") else "; a kept attention block's assigned share is taken by its "
                        "layer's MLP channels"))
    for r in d.get("speedup_rounds", []):
        lines.append(f"  speedup round: cost-model goal {r['cost_model_goal']:.3f}, predicted {r['predicted']:.3f}, "
                     f"measured {r['speedup']:.3f} ({r['dense_ms']:.1f} -> {r['pruned_ms']:.1f} ms, prompt {r['prompt_len']}"
                     + (f", {r['pairs']} pairs, spread {r['spread']:.3f}" if "pairs" in r else "")
                     + (", cached" if r.get("cached") else "") + (", busy machine" if r.get("loaded") else "") + ")")
    cm = d.get("cost_model")
    if cm:
        per = ", ".join(f"{k} {v * 1e6:.3f}" for k, v in cm["ms_per_param"].items())
        lines.append(f"  cost model ({cm['device']}, prompt {cm['prompt_len']}, dense {cm['dense_ms']:.1f} ms): "
                     f"ms saved per million params removed: {per}")
        st = cm.get("steadiness")
        if st and st["kinds"]:
            kinds = ", ".join(f"{k} {v['fraction_saved']:.3f} +- {v['spread']:.3f} ({v['pairs']} pairs)"
                              for k, v in st["kinds"].items())
            busy = " (measured on a busy machine: provisional)" if (st.get("load") or {}).get("loaded") else ""
            lines.append(f"  fraction of the dense time saved, per-pair spread: {kinds}{busy}")
    alloc = d.get("allocation")
    blocks = d["blocks"]
    if alloc:
        unit = alloc["saving_unit"]
        st = alloc["stages"]
        loss, why = alloc.get("response_loss"), alloc.get("response_loss_why") or "--response-loss kl"
        top = f", over each dense distribution's top {alloc['response_kl_top']} tokens" if alloc.get("response_kl_top") else ""
        kl = f" ({why}: KL divergence from the dense model{top}, nats/token)" if loss == "kl" else (
            f" (NLL, {why})" if why.startswith("auto") else "")
        lines.append(f"  assignment: measured responses{kl} + exact knapsack, {len(st)} stage(s), "
                     f"{alloc.get('evaluations_measured', '?')} responses measured ({alloc.get('evaluations', '?')} used); "
                     f"price at the margin {_price(st[-1].get('price'))} nats/token per {unit} saved")
        head = (f"{'block':<7} {'params':>10} {'importance':>10} {'cost_ms':>7} {'remove':>8}  {'chosen':<16} {'saving':>8} "
                f"{'dloss':>8}  why")
        lines += ["", head, "-" * len(head)]
        for b in blocks:
            opt = next(o for o in b["options"] if o["option"] == b["option"]) if b["options"] else None
            lines.append(f"{b['block']:<7} {b['params']:>10,} {_num(b['importance'], '.3f', 10)} "
                         f"{_num(b['cost_ms_whole'], '.2f', 7)} {_num(b.get('response_whole'), '.4f', 8)}  "
                         f"{b['option']:<16} {_num(opt and opt['saving'], '.3f', 8)} {_num(opt and opt['dloss'], '.4f', 8)}  "
                         f"{b.get('why') or ''}")
        lines += ["", f"measured options of the last stage (option: loss increase in nats/token @ saving in {unit}):"]
        for b in blocks:
            lines.append(f"  {b['block']:<7} " + ", ".join(f"{o['option']}: {o['dloss']:+.4f} @ {o['saving']:.3f}"
                                                         for o in b["options"]))
        lines.append("")
        lines.append(f"importance: transfer entropy (nats) to the final stream given the block's input ('-': not "
                     f"computed, see --te); cost_ms: prefill time saved if removed whole ('-': no --speedup); remove: loss "
                     f"increase (nats/token) when this block alone is removed from the dense model; chosen: the "
                     f"knapsack's option, its saving ({unit}) and loss increase in the last stage; why: its marginal "
                     f"rates against the neighbouring options, and the price the budget pays at the margin")
        return "\n".join(lines)
    head = f"{'block':<8} {'params':>10} {'importance':>11} {'load':>6} {'cost_ms':>8} {'assigned':>9} {'removed':>8}  action"
    lines += ["", head, "-" * len(head)]
    for b in blocks:
        lines.append(f"{b['block']:<8} {b['params']:>10,} {_num(b['importance'], '.4f', 11)} {b['load_weight']:>6.2f} "
                     f"{_num(b['cost_ms_whole'], '.2f', 8)} {b['ratio_assigned']:>9.3f} {b['units_removed']:>8.3f}  {b['action']}")
    lines.append("")
    lines.append("importance: transfer entropy (nats) from the block to the final stream given its input ('-': not "
                 "computed); load: relative share of the budget; cost_ms: prefill time saved if removed whole; "
                 "assigned: block ratio (1 = removed whole); removed: fraction of its heads / channels removed")
    return "\n".join(lines)


def _price(p) -> str:
    return "-" if p is None else f"{p:.3g}"


def run(args):
    print(format_table(load_result(args.folder)))
