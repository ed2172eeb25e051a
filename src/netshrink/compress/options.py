"""What ``netshrink compress`` searches over, and how much each candidate is trained."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from netshrink.errors import UserError
from netshrink.limits import MAX_SEED
from netshrink.train.config import AmpMode

# The lists of the search space left out: the walk's and the latency halving's, and
# the size halving's, leaner: its space is their product with the sparsities (124
# structures at the walk's lists, two hours of rung 0 alone on 2 cores), and its pick
# needs channels cut and blocks removed whatever the sparsity (a file 50x smaller than
# FP32 needs about 0.6 bits per original weight; a sparse file pays a bit per weight for
# its mask).
GRIDS: dict[str, dict[str, list[float] | list[int]]] = {
    "default": {"channel_ratios": [0.2, 0.35, 0.5, 0.6], "drop_blocks": [1, 2, 3, 4],
                "sparsities": [0.5, 0.7, 0.8, 0.9]},
    "halving size": {"channel_ratios": [0.35, 0.5, 0.6], "drop_blocks": [2, 4],
                     "sparsities": [0.5, 0.75]},
    # speed reaches further: at batch 1 the quickstart student's INT8 on OpenVINO ran
    # about 0.1 ms from 4 blocks removed and 60% of the channels on, but at batch 32 the
    # structure with 70% of the channels cut ran 6.5x the dense model's throughput
    # against 3.9x at 60% (untrained, benchmark_app, side by side)
    "halving speed": {"channel_ratios": [0.2, 0.35, 0.5, 0.6, 0.7], "drop_blocks": [1, 2, 3, 4],
                      "sparsities": [0.5, 0.7, 0.8, 0.9]},
}

# The fine-tuning learning rate left out, by search (see ``finetune_lr``).
FINETUNE_LR = {"halving": 0.03, "walk": 0.01}


class CompressConfig(BaseModel):
    """Settings of the compression search.

    Attributes:
        budget_points: the most top-1 (percentage points, on the validation split) the
            deployable file may lose against the input model.
        reserve_points: of the budget, what a candidate must keep unspent on the
            validation split: the pick is the smallest of many candidates near the budget's
            edge, so its validation top-1 is likelier lucky than not, and on new images it
            tends to lose more (the winner's curse; with 5,000 images one point-estimate of
            a drop is uncertain by about 0.3 points). 0: judge on the budget alone.
        target: ``size`` (bytes on disk of the deployable file: channel pruning, then
            unstructured sparsity, then k-means weight sharing in the packed format) or
            ``latency`` (time on ``runtime``, as ``speed`` says: channel pruning, then
            INT8 with float fallback of the layers that cost accuracy).
        speed: what ``target latency`` minimises: ``batch1``, the batch-1 p50; ``both``,
            the geometric mean of the batch-1 p50 and the time per image of a
            ``measure_batch`` call (a model serving one image at a time and one serving
            batches both gain: at batch 1 a call's fixed cost left the quickstart's most
            pruned structures all near 0.1 ms, while their batch-32 throughputs differed
            by two thirds). Constraints bound the batch-1 p50 either way.
        runtime: where INT8 candidates run and are timed; ``auto``: both runtimes timed
            side by side on the unpruned model (the search deploys on the faster) and on
            the pick (the faster kept). None: ``auto`` where speed is judged by the
            halving search, else ``onnxruntime``.
        deploy: the last step: ``kmeans`` (shared weight values in the packed ``.nspk``,
            the smallest file; it runs as float in torch), ``int8`` (static INT8 on
            ``runtime`` with float fallback; for ``size`` its packed ``.nspk``, sparse
            int8 weights and zstd, is the file counted and chosen: small *and* fast), or
            ``auto``: ``kmeans`` for ``size``, ``int8`` for ``latency``.
        channel_ratios: fractions of every coupled channel group removed, tried in
            increasing order until one breaks the budget (0, no channel pruning, is
            always tried first). Left out, ``channel_ratios``, ``drop_blocks`` and
            ``sparsities`` take ``GRIDS``: a leaner space for the halving search on
            ``size``, one to 70% of the channels for its other searches.
        channel_scope: ``sensitivity``: each channel ratio is shared out among the
            coupled groups by a channel sensitivity scan on the validation split (robust
            and large groups lose more, as many parameters in all); ``layer``: every
            group loses the same fraction.
        channel_round_to: every kept channel count a multiple of this (rounded down, at
            least one multiple). None: 16 for ``latency``, 1 for ``size``. Why: oneDNN's
            INT8 kernels (OpenVINO, ONNX Runtime) work in blocks of 16 channels, so a layer
            left with 58 runs no faster than one with 64; on the AMD EPYC here an INT8
            ResNet-18 at ratio 0.5 with 3 blocks removed ran 29,800 img/s at batch 32 in
            OpenVINO with the scan's widths, 56,700 with each width halved (multiples of
            16).
        drop_blocks: numbers of residual blocks removed (depth pruning, the least harmful
            first by a scan on the validation split), tried in increasing order on the last
            channel ratio that held, until one breaks the budget (``[]``: none). For
            ``latency`` the blocks come first and the channel ratios are walked on the
            deepest cut that held (``blocks_first``): at batch 1 a removed layer saves its
            whole per-call cost, and depth costs little accuracy (the quickstart student
            lost 0.26 points of validation top-1 without 4 of its 8 blocks, 2.2 without
            half of every layer's channels), while the channel ratio is shared out by
            compute (MACs), not parameters.
        sparsities: global unstructured sparsities tried on the chosen channel ratio and
            depth (``size`` only), increasing, until one breaks the budget.
        kmeans_bits: index widths of the weight sharing (2**bits values a layer), tried
            in this order for each structure until one keeps the budget; a later structure
            starts from the width the previous one needed.
        kmeans_finetune_epochs: epochs of fine-tuning the shared values (0: none).
        finetune_epochs / finetune_lr / batch_size: the knowledge-distillation fine-tuning
            after each pruning step (the input model is the teacher). ``finetune_lr``
            None: ``FINETUNE_LR`` by search, 0.03 for halving (each rung restarts its
            cosine schedule there; on the quickstart student 4 blocks removed and half
            the channels ended at 90.96% INT8 validation top-1 against 90.54% at 0.01,
            while 2 blocks removed held 91.34% float after rung 1, 91.28% at 0.01), 0.01
            for the walk's one-epoch steps, as its recorded searches ran.
        kmeans_finetune_lr: the learning rate of the k-means shared values' fine-tuning.
        alpha / temperature: that distillation's soft-loss weight and temperature.
        augment: the fine-tunings' training augmentation; None: as the input model's
            run trained it (its file records that), else the dataset's default (on). Short
            fine-tunings of a model trained without it lose to it: on the quickstart's
            student, channel ratio 0.2 then one epoch cost 0.10 points of validation top-1
            without augmentation and 0.58 with it.
        amp: the fine-tunings' mixed precision (``native``: bf16 autocast where the device
            computes bf16 natively, fp32 elsewhere; see ``TrainConfig.amp``).
        val_size: images held out of the training split to decide on (never the test
            split); calib_size: calibration images for INT8.
        timing: time every candidate (batch 1 and ``measure_batch``); ``latency`` needs it.
        measure_batch: the throughput batch size.
        threads: threads while timing; None: the recipes' default (2).
        search: ``halving`` (successive halving: every structure of the space fine-tuned
            briefly and judged, the promising third fine-tuned longer, rung after rung,
            ranked by the Pareto front of top-1 and the target among those the budget
            (or the constraint) can still admit) or ``walk`` (each list walked upwards
            until one breaks the budget, one fine-tuning length for all: the search
            before halving, kept to compare with).
        rungs: the halving's fine-tuning epochs added at each rung (cumulative: a
            candidate promoted to rung 2 has had their sum up to it). Rung 0 judges the
            float model against the budget widened by the recovery still to come;
            later rungs deploy (INT8 or k-means) and judge the deployed file. A longer
            last rung did not pay: the quickstart student with 4 blocks removed and
            half its channels held 90.54% validation top-1 after 8.25 epochs in all,
            90.50% after 16.25.
        eta: of each rung, about one in ``eta`` goes on to the next (at least two).
        confidence: a candidate is within the budget when the upper bound of its drop
            at this one-sided confidence is (the drop measured on the same validation
            images as the input model, paired image by image), not its point estimate.
        max_latency_ms / max_size_mb / max_macs / speedup: constraint-first: the most
            accurate deployable file that meets the constraint (batch-1 p50 on the
            runtime, measured; bytes on disk; multiply-accumulates; or batch-1 speed-up
            over the input model deployed unpruned on the runtime) instead of the
            smallest or fastest within the budget.
        time_budget_s: the search stops starting candidates that would end past this
            many seconds of this call (the best found so far is chosen); None: no limit.
        workers / executor: candidates of one rung at once, in a process pool
            (``local``) or as Ray tasks (``ray``); timings taken meanwhile are
            contended, so the pick is re-timed side by side at the end.
    """

    model_config = ConfigDict(extra="forbid")

    budget_points: float = Field(default=1.0, ge=0, le=100, allow_inf_nan=False)
    reserve_points: float = Field(default=0.25, ge=0, le=100, allow_inf_nan=False)
    target: Literal["size", "latency"] = "size"
    speed: Literal["batch1", "both"] = "both"
    runtime: Literal["onnxruntime", "openvino", "auto"] | None = None
    deploy: Literal["auto", "kmeans", "int8"] = "auto"
    channel_ratios: list[float] | None = None
    channel_scope: Literal["sensitivity", "layer"] | None = None
    channel_round_to: int | None = Field(default=None, ge=1)
    drop_blocks: list[int] | None = None
    sparsities: list[float] | None = None
    kmeans_bits: list[int] = Field(default_factory=lambda: [4, 5, 6, 8])
    kmeans_finetune_epochs: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    finetune_epochs: int = Field(default=1, gt=0)
    finetune_lr: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    kmeans_finetune_lr: float = Field(default=0.01, gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=256, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0, allow_inf_nan=False)
    augment: bool | None = None
    amp: AmpMode = "native"
    val_size: int = Field(default=5000, gt=0)
    calib_size: int = Field(default=512, gt=0)
    timing: bool = True
    measure_batch: int = Field(default=32, gt=0)
    threads: int | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, gt=0)  # per fine-tuning (quick trials)
    search: Literal["halving", "walk"] = "halving"
    rungs: list[float] = Field(default_factory=lambda: [0.25, 1.0, 3.0, 4.0])
    eta: int = Field(default=3, ge=2, le=16)
    confidence: float = Field(default=0.9, ge=0.5, lt=1)
    max_latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_size_mb: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_macs: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    speedup: float | None = Field(default=None, gt=1, allow_inf_nan=False)
    time_budget_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    workers: int = Field(default=1, ge=1, le=64)
    executor: Literal["local", "ray"] = "local"

    @property
    def timing_threads(self) -> int:
        """``threads`` with None resolved: the recipes' default (``MeasureConfig``). The
        candidates are measured by recipes, so the side-by-side retiming and the latency
        model must run that count too, never the caller's torch setting."""
        from netshrink.bench.options import MeasureConfig

        return self.threads or MeasureConfig().threads

    @property
    def constraint(self) -> tuple[str, float] | None:
        """The constraint of constraint-first mode (``latency_ms``, ``size_mb``,
        ``macs`` or ``speedup``, and its bound), or None."""
        given = [(name, value) for name, value in (
            ("latency_ms", self.max_latency_ms), ("size_mb", self.max_size_mb),
            ("macs", self.max_macs), ("speedup", self.speedup)) if value is not None]
        return given[0] if given else None

    @property
    def scope(self) -> str:
        """``channel_scope`` with None resolved: ``layer`` for latency and constraint
        searches (widths cut alike stay in whole blocks of 16 channels, which INT8
        kernels run fastest; the recorded best latency pick used it), ``sensitivity``
        for size."""
        if self.channel_scope is not None:
            return self.channel_scope
        if self.search == "walk":
            return "sensitivity"  # the walk's default, as its recorded searches ran
        return "sensitivity" if self.for_size else "layer"

    @property
    def deploy_method(self) -> str:
        """``kmeans`` or ``int8``: ``deploy`` with ``auto`` resolved by the target."""
        if self.deploy != "auto":
            return self.deploy
        return "kmeans" if self.for_size else "int8"

    @property
    def int8_runtime(self) -> str:
        """``runtime`` with None resolved: ``auto`` where the halving search judges
        speed with INT8, else ``onnxruntime``."""
        if self.runtime is not None:
            return self.runtime
        speed = self.judges_speed and self.deploy_method == "int8"
        return "auto" if speed and self.search == "halving" else "onnxruntime"

    @property
    def judges_speed(self) -> bool:
        """Whether batch-1 latency is minimised (``target latency``) or bounded
        (``max_latency_ms``, ``speedup``)."""
        if self.constraint is not None:
            return self.constraint[0] in ("latency_ms", "speedup")
        return self.target == "latency"

    @property
    def ranks_batch_too(self) -> bool:
        """Whether the batch-``measure_batch`` time counts beside batch-1 latency (the
        halving search's ``target latency`` with ``speed both``, no constraint)."""
        return (self.search == "halving" and self.target == "latency"
                and self.constraint is None and self.speed == "both")

    @property
    def for_size(self) -> bool:
        """Whether bytes on disk are what is minimised or bounded (``target size`` with
        no constraint, or ``max_size_mb``), rather than speed."""
        if self.constraint is not None:
            return self.constraint[0] == "size_mb"
        return self.target == "size"

    @property
    def blocks_first(self) -> bool:
        """Whether depth pruning is walked before the channel ratios (``latency``)."""
        return not self.for_size

    @property
    def round_to(self) -> int:
        """``channel_round_to`` with None resolved by the target."""
        if self.channel_round_to is not None:
            return self.channel_round_to
        return 1 if self.for_size else 16

    @field_validator("kmeans_bits")
    @classmethod
    def _bits(cls, values: list[int]) -> list[int]:
        if not values or any(not 1 <= b <= 8 for b in values):
            raise ValueError(f"{values}: give one or more widths from 1 to 8")
        if values != sorted(set(values)):
            raise ValueError(f"{values}: list each width once, in increasing order")
        return values

    @property
    def spendable_points(self) -> float:
        """What a candidate may lose on the validation split: the budget less the reserve
        (never below 0)."""
        return max(0.0, self.budget_points - self.reserve_points)

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, values: list[float]) -> list[float]:
        if not values or len(values) > 8 or any(not 0 < v <= 100 for v in values):
            raise ValueError(f"{values}: give 1 to 8 epoch counts, each in (0, 100]")
        return values

    @model_validator(mode="after")
    def _grid(self) -> CompressConfig:
        """The lists left out, by search and target (``GRIDS``), and the learning rate
        (``FINETUNE_LR``)."""
        grid = GRIDS["default" if self.search == "walk" else
                     "halving size" if self.for_size else "halving speed"]
        for name, values in grid.items():
            if getattr(self, name) is None:
                setattr(self, name, list(values))
        if self.finetune_lr is None:
            self.finetune_lr = FINETUNE_LR[self.search]
        return self

    @model_validator(mode="after")
    def _one_constraint(self) -> CompressConfig:
        given = [n for n in ("max_latency_ms", "max_size_mb", "max_macs", "speedup")
                 if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one constraint, not {' and '.join(given)}")
        if given and self.search == "walk":
            raise ValueError(f"{given[0]} needs search halving (the walk has no "
                             "constraint mode)")
        if self.runtime == "auto" and (self.deploy_method == "kmeans" or self.search == "walk"):
            raise ValueError("runtime auto chooses where INT8 runs, in the halving "
                             "search: give deploy int8 (or target latency), search halving")
        return self

    @field_validator("drop_blocks")
    @classmethod
    def _ascending_counts(cls, values: list[int] | None) -> list[int] | None:
        if values is None:
            return values
        if any(v < 1 for v in values) or values != sorted(set(values)):
            raise ValueError(f"{values}: list block counts of 1 or more once each, increasing")
        return values

    @field_validator("channel_ratios", "sparsities")
    @classmethod
    def _ascending_fractions(cls, values: list[float] | None) -> list[float] | None:
        for v in values or []:
            if not 0 < v < 1:
                raise ValueError(f"{v} is not a fraction in (0, 1)")
        if values != sorted(set(values)):
            raise ValueError(f"{values}: list each ratio once, in increasing order")
        return values


def compress_config(settings: dict[str, object], *, flags: bool = False) -> CompressConfig:
    """``settings`` validated; a bad one is a ``UserError`` naming it (as a command-line
    flag, ``--budget-points``, when ``flags``)."""
    try:
        return CompressConfig.model_validate(settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "settings"
        where = "--" + name.replace("_", "-") if flags else name
        if err["type"] == "extra_forbidden":
            raise UserError(f"{where}: unknown setting; known: "
                            f"{', '.join(CompressConfig.model_fields)}") from None
        raise UserError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None


class RecordedSplit(BaseModel):
    """The held-out split a model file records (``meta.split``, written by the run that
    trained it), checked before the search builds its data from it: a file edited by hand
    must not turn into a traceback (``int("x")``) or a seed no generator takes."""

    model_config = ConfigDict(extra="ignore", strict=True)

    val_size: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=0, ge=0, le=MAX_SEED)  # as data.seed
    train_limit: int | None = Field(default=None, gt=0)
    augment: bool | None = None


def held_out_split(cfg: CompressConfig, data: dict[str, Any], split: Any,
                   source: str = "the input model") -> tuple[CompressConfig, list[str]]:
    """Decide on the images the input model never saw: its own run's validation split
    (the same size and seed, so the same images) when its file records one, and fine-tune
    with its run's augmentation unless ``cfg.augment`` says otherwise. A model
    trained on every training image has no such images; say what that does to the
    decisions.

    Raises:
        UserError: the recorded split is not one netshrink writes (edited by hand).
    """
    if not isinstance(split, dict):
        return cfg, []
    try:
        recorded = RecordedSplit.model_validate(split)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{source}: corrupt model metadata: split.{where}: {err['msg']} "
                        "(the held-out split its run recorded); re-save it with netshrink "
                        "(train and run write model files)") from None
    if cfg.augment is None and recorded.augment is not None:
        cfg = cfg.model_copy(update={"augment": recorded.augment})
    val_size = recorded.val_size
    if val_size:
        data["seed"] = recorded.seed or 0
        if recorded.train_limit:
            data["train_limit"] = recorded.train_limit
        return cfg.model_copy(update={"val_size": val_size}), [
            f"deciding on the input model's own validation split ({val_size:,} images it "
            "was not trained on)"]
    if val_size == 0:
        return cfg, [
            "the input model was trained on every training image, so the validation "
            f"images ({cfg.val_size:,}, held out of the candidates' fine-tuning) are not new "
            "to it: its validation top-1 overstates it against the candidates, and the "
            "budget is judged conservatively (a candidate the test split would accept may "
            "be turned down). Train the model with data.val_size > 0 to decide on images "
            "it never saw."]
    return cfg, []
