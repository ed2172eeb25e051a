"""Commands are recipes: a one-off recipe of the command's stages, run into ``--out``
with the recipe's checks, measurements and resume (``train``, ``distill``, ``prune``,
``quantize``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from netshrink.errors import UserError

if TYPE_CHECKING:
    from netshrink.recipe import RunRecord


def run_as_recipe(
    args: argparse.Namespace, source: str, *, model: dict, data: dict, stages: list[dict]
) -> RunRecord:
    """Run a one-off recipe into ``args.out`` (commands are recipes: same checks, same
    measurements, same resume) and print where its final model is."""
    from netshrink.recipe import parse_recipe, run_recipe

    raw = {
        "name": args.out.name,
        "device": args.device,
        "model": model,
        "data": data,
        "stages": stages,
        "trust": list(getattr(args, "trust", None) or []),
    }
    if getattr(args, "no_timing", False):
        raw["measure"] = {"latency": False}
    # A weights file's baseline is measured once per file, settings and machine: the
    # second prune or quantize of the same file does not pay for timing it again.
    record = run_recipe(parse_recipe(raw, source=source), args.out,
                        reuse_baseline_measurement=model.get("weights") is not None)
    print(f"model: {args.out / record.stages[-1].artifact}")  # type: ignore[operator]
    return record


def run_on_weights(args: argparse.Namespace, source: str, stages: list[dict]) -> RunRecord:
    """Run ``stages`` on the model file ``args.weights`` and print before/after figures."""
    from netshrink.stages.start import section_of
    from netshrink.store.checkpoint import load_model

    _, spec, meta = load_model(args.weights)
    dataset = args.data or meta.get("dataset")
    if dataset is None:
        raise UserError(f"{args.weights}: the file does not say its dataset; pass --data")
    record = run_as_recipe(
        args, source, model=section_of(spec, args.weights),
        data={**data_fields(args, dataset, named_by_file=args.data is None),
              "image_size": meta.get("image_size"), **extra_data(args)},
        stages=stages,
    )
    first, last = record.stages[0].measurement, record.stages[-1].measurement
    for label, m in (("before", first), ("after", last)):
        assert m is not None
        acc = f", top-1 {m.accuracy.top1 * 100:.2f}%" if m.accuracy else ""
        size = f", {m.size_bytes / 1e6:,.2f} MB" if m.size_bytes else ""
        print(f"{label}: {m.params:,} params, {m.nonzero_params:,} non-zero, "
              f"{(m.macs or 0) / 1e6:,.1f} M MACs{size}, {m.runtime} {m.precision}{acc}")
    speed = _speed_line(record)
    if speed:
        print(speed)
    return record


def _speed_line(record: RunRecord) -> str | None:
    """Before against after as timed side by side at the end of the run (the baseline's
    own timing may come from the cache, taken another day): None when they were not; no
    figure at all when a timing was noisy, only which and why."""
    from netshrink.report.verdict import runtime_family, runtime_name

    sbs = record.side_by_side
    first, last = record.stages[0], record.stages[-1]
    a, b = (sbs.of(first), sbs.of(last)) if sbs is not None else (None, None)
    if sbs is None or a is None or b is None or first.measurement is None \
            or last.measurement is None:
        return None
    noisy = [f"{t.stage} {what}: {reason}" for t in (a, b)
             for what, lat in (("latency", t.latency), ("throughput", t.throughput))
             if lat is not None and (reason := lat.noise_reason()) is not None]
    if noisy:
        return (f"speed: not measured (the side-by-side timing was noisy: {'; '.join(noisy)}; "
                "measure again on a quiet machine)")
    before, after = runtime_name(first.measurement), runtime_name(last.measurement)
    text = (f"speed, timed side by side ({sbs.rounds} rounds round-robin): batch-1 p50 "
            f"{a.latency.p50_ms:.3f} ms ({before}) -> {b.latency.p50_ms:.3f} ms "
            f"({after}), {a.latency.p50_ms / b.latency.p50_ms:.2f}x")
    if a.throughput is not None and b.throughput is not None:
        text += (f"; batch {b.throughput.batch_size} {a.throughput.images_per_s:,.0f} -> "
                 f"{b.throughput.images_per_s:,.0f} img/s, "
                 f"{b.throughput.images_per_s / a.throughput.images_per_s:.2f}x")
    if runtime_family(first.measurement) != runtime_family(last.measurement):
        text += (f" (across runtimes, {after} vs {before}: the runtime's share is in the "
                 "report)")
    else:
        text += f" (both in {before})"
    return text


def data_fields(args: argparse.Namespace, name: str | None = None, *,
                 named_by_file: bool = False) -> dict[str, object]:
    """The data section's source: ``--data`` (or the file's dataset, ``name``) as a
    dataset's name or a factory's, with ``--data-kwargs``."""
    from netshrink.data import data_source

    return data_source(name or args.data, kwargs=args.data_kwargs, root=args.data_dir,
                       named_by_file=named_by_file,
                       where=str(getattr(args, "weights", None) or "the model file"))


def extra_data(args: argparse.Namespace) -> dict[str, object]:
    extra: dict[str, object] = {}
    if getattr(args, "val_size", None) is not None:
        extra["val_size"] = args.val_size
    return extra
