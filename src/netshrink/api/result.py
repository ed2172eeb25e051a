"""What every verb returns: a model, or a deployable file with the runtime that runs it,
that can be called on a batch, evaluated, measured and saved (and loaded back)."""

from __future__ import annotations

import json
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from netshrink.api.data import Data, as_split
from netshrink.api.reload import check_rebuild
from netshrink.bench import Accuracy, Measurement, MeasureOptions, evaluate, measure
from netshrink.errors import UserError
from netshrink.models import ModelSpec, custom_spec
from netshrink.models.factory import check_factory
from netshrink.runtime import ModelStats, model_stats, open_runtime
from netshrink.runtime.base import Executable
from netshrink.store.atomic import atomic_write_bytes
from netshrink.store.checkpoint import save_model
from netshrink.store.codebook import Codebook
from netshrink.store.kinds import file_kind
from netshrink.store.outputs import check_output_file, is_model_kind, output_folder
from netshrink.store.packed import pack_model

__all__ = ["Compressed", "ScratchFolder"]


class ScratchFolder:
    """A temporary folder that lives as long as this object: removed when the last
    reference to it goes (or at interpreter exit at the latest), or by ``remove``.

    A verb run without ``out=`` leaves its result's file in the folder it worked in; the
    result holds this object, so the file lasts exactly as long as the result (and any
    copy of it) that runs it, and no folder outlives them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # weakref.finalize rather than __del__: it also runs at interpreter exit, and it
        # holds no reference to self, so it cannot keep the object alive.
        self._finalizer = weakref.finalize(self, shutil.rmtree, path, ignore_errors=True)

    def remove(self) -> None:
        """Remove the folder now (once; later calls do nothing)."""
        self._finalizer()

    @property
    def removed(self) -> bool:
        """Whether the folder was removed (by ``remove``, or its owner going away)."""
        return not self._finalizer.alive

    def __copy__(self) -> ScratchFolder:
        return self  # a copied result shares the one folder: removed after the last

    def __deepcopy__(self, memo: dict) -> ScratchFolder:
        return self


@dataclass
class Compressed:
    """A model as a verb left it.

    Attributes:
        model: the torch model (for a deployable file: the float model it was made from,
            or None when loaded from such a file alone).
        file: the deployable file (INT8 ONNX, OpenVINO IR, packed ``.nspk``) when the
            result runs outside torch; None for a torch model.
        runtime: what runs it: ``torch``, ``onnxruntime`` or ``openvino``.
        precision: ``fp32``, ``int8``, ... as the runtime computes it.
        spec: the netshrink architecture (``ModelSpec``) when it is one of netshrink's
            models; None for the user's own.
        factory: for the user's own model, the ``module:function`` that builds it (needed
            to save it; see ``save``).
        meta: what a saved file carries for ``eval``/``predict`` (class names, image size,
            mean/std, dataset).
        input_shape: one image ``[C, H, W]``.
        notes: what the verb did, in words.
        codebooks: k-means codebooks by layer (packed into ``.nspk`` files on save).

    A result made without ``out=`` keeps its file in a temporary folder that is removed
    once the result (and every copy of it) is garbage collected: ``save`` the file, or
    give the verb ``out=``, to keep it.
    """

    model: nn.Module | None
    input_shape: list[int]
    file: Path | None = None
    runtime: str = "torch"
    precision: str = "fp32"
    spec: ModelSpec | None = None
    factory: str | None = None
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    codebooks: dict[str, Codebook] | None = None
    stats: ModelStats | None = None
    _session: nn.Module | None = field(default=None, repr=False)
    # The temporary folder ``file`` lives in, when a verb made it there: held so that the
    # folder goes with the last result that can run its file (``ScratchFolder``).
    _scratch: ScratchFolder | None = field(default=None, repr=False, compare=False)

    def _spec_to_save(self, model: nn.Module, factory: str | None,
                      factory_kwargs: dict[str, Any] | None) -> ModelSpec:
        """How the saved file rebuilds ``model``: netshrink's spec, or the user's factory.

        Raises:
            UserError: the user's own model and no factory to rebuild it with.
        """
        if factory is not None or (self.spec is None and self.factory is not None):
            check_factory(factory or self.factory)
            try:
                json.dumps(factory_kwargs or {})
            except TypeError as exc:
                raise UserError(f"factory_kwargs must be JSON values ({exc})") from None
            return custom_spec(model, factory or self.factory,  # type: ignore[arg-type]
                               factory_kwargs or self.factory_kwargs)
        if self.spec is None:
            raise UserError(
                f"{type(model).__name__} is not one of netshrink's models: save it with the "
                "import path of the function that builds it, save(path, factory="
                "'package.module:function'); load(path, trust=[...]) calls it to rebuild")
        return self.spec

    def _file_as_is(self, path: Path, factory: str | None, meta: dict[str, Any] | None
                    ) -> bool:
        """Whether saving a torch result as ``path`` is a copy of its file (a k-means
        ``.nspk``): the same kind, and no other factory or facts to write into it."""
        return (self.file is not None and path.suffix == self.file.suffix
                and factory is None and meta is None)

    @property
    def module(self) -> nn.Module:
        """What runs it: the torch model, or the runtime's session over ``file``."""
        if self.file is None or self.runtime == "torch":
            if self.model is None:
                raise UserError("this result holds no model to run")
            return self.model
        if self._session is None:
            self._session = self._open_session(None)
        return self._session

    def _open_session(self, threads: int | None) -> nn.Module:
        """The runtime's session over ``file``, with ``threads`` intra-op threads (None:
        torch's current count, ``open_runtime``'s default)."""
        assert self.file is not None
        stats = self.stats or (model_stats(self.model, self.input_shape)
                               if self.model is not None else ModelStats(0, 0, None))
        session = open_runtime(self.file, self.runtime, stats=stats, threads=threads,
                               precision=self.precision if self.runtime == "openvino"
                               else None)
        if self._session is not None:  # what ``load`` learned of the file still holds
            session.activation_bytes = getattr(self._session, "activation_bytes", None)
        return session

    def _module_with(self, threads: int) -> nn.Module:
        """``module``, its runtime session opened again when it runs another number of
        threads than ``threads`` (a session's count is fixed when it is made)."""
        module = self.module
        if isinstance(module, Executable) and module.threads not in (None, threads):
            self._session = module = self._open_session(threads)
        return module

    def __call__(self, images: Tensor) -> Tensor:
        """Logits for a batch of images ``[N, C, H, W]``."""
        module = self.module
        with torch.inference_mode():
            return module(images)

    def evaluate(self, data: Data, *, device: str = "cpu") -> Accuracy:
        """Top-1/top-5 on labelled data (a DataLoader or iterable of ``(images, labels)``)."""
        split = as_split(data, "data")
        assert split is not None
        module = self.module
        if not isinstance(module, Executable):
            module = module.to(device)
        return evaluate(module, split, device=device if not isinstance(module, Executable)
                        else "cpu")

    def measure(self, data: Data | None = None, *, options: MeasureOptions | None = None
                ) -> Measurement:
        """Size (of the saved or deployable file), params, MACs, latency, throughput,
        memory and, with ``data``, top-1/top-5 — ``netshrink.bench.measure``.

        A runtime's session runs the threads ``options.threads`` asks for, else the
        caller's current torch count (``torch.get_num_threads()``), as a torch model
        would: one opened with another count is opened again for it."""
        split = as_split(data, "data")
        size_file = self.file
        asked = options.threads if options is not None else None
        module = self._module_with(asked if asked is not None else torch.get_num_threads())
        return measure(module, input_shape=self.input_shape, data=split,
                       file=size_file, options=options)

    def save(self, path: str | Path, *, factory: str | None = None,
             factory_kwargs: dict[str, Any] | None = None,
             meta: dict[str, Any] | None = None) -> Path:
        """Write the result where ``netshrink.load`` (and ``eval``/``predict``/``bench``)
        read it back: a torch model as ``.safetensors`` (``.nspk`` packs it, k-means
        codebooks and zeros bit-packed), a deployable file as a copy.

        Args:
            factory: for a model netshrink did not build: ``"package.module:function"``
                that builds it (with ``factory_kwargs``); loading calls it only when the
                loader trusts it. Without one such a model is refused here, not at load.
            meta: facts for ``eval``/``predict`` (``class_names``, ``mean``, ``std``,
                ``image_size``, ``dataset``), over what the result already has.

        Raises:
            UserError: a model netshrink did not build and no factory, or a suffix this
                kind of result is not written as; a factory that will not rebuild the
                model (checked once written: the file is removed again).
        """
        path = Path(path)
        facts = {**self.meta, **(meta or {})}
        if self.file is not None and (self.runtime != "torch" or self.model is None
                                      or self._file_as_is(path, factory, meta)):
            if path.suffix != self.file.suffix:
                raise UserError(f"{path}: this result is a {self.file.suffix} file; save it "
                                f"under that suffix")
            ir = self.file.suffix == ".xml"  # OpenVINO IR: the weights file goes with it
            pairs = [(self.file, path)] + ([(self.file.with_suffix(".bin"),
                                             path.with_suffix(".bin"))] if ir else [])
            check_output_file(path, flag="save path", writes=f"a {self.file.suffix} model",
                              replaceable=is_model_kind(file_kind(self.file)),
                              inputs=[src for src, _ in pairs],
                              companions=[dest for _, dest in pairs[1:]])
            with output_folder(path.parent):
                for src, dest in reversed(pairs):  # the .bin before the .xml that names it
                    atomic_write_bytes(dest, src.read_bytes())
            return path
        kind = {".nspk": "nspk", ".safetensors": "safetensors"}.get(path.suffix)
        if kind is None:
            raise UserError(f"{path}: save a torch model as .safetensors (or .nspk)")
        check_output_file(path, flag="save path", writes=f"a {path.suffix} model",
                          replaceable=is_model_kind(kind))
        model = self.module.cpu()
        spec = self._spec_to_save(model, factory, factory_kwargs)
        with output_folder(path.parent):
            if kind == "nspk":
                pack_model(model, spec, path, codebooks=self.codebooks, meta=facts)
            else:
                save_model(model, spec, path, meta=facts)
            if spec.factory is not None:  # the user's model: refused now if it won't reload
                check_rebuild(path, spec.factory, self.input_shape)
        return path
