"""Where searches run: the CPU, or one CUDA GPU for the sealed FAISS indexes and the linear query maps.

``ServerConfig.device`` is ``"cpu"`` (the default), ``"cuda"`` or ``"cuda:N"``, parsed by
:meth:`Device.parse` and checked once at server start by :meth:`Device.check_available`: a GPU
device needs a faiss build that reports GPUs (``faiss-gpu``, not ``faiss-cpu``). On the CPU
:meth:`Device.search_cpu` sends batches to the one search thread (:mod:`.search_thread`), every GPU
method is the identity or a no-op, and torch is never imported.

On a GPU the segments keep every sealed index on the CPU (merges, checkpoints and
``clone_index`` work on it) and search a copy made by :meth:`Device.to_search_index` with
``faiss.index_cpu_to_gpu``. FAISS has GPU versions of Flat, IVF*,Flat, IVF*,PQ* and IVF*,SQ* (and
SQfp16, served as a float16 GpuIndexFlat); HNSW has none (only IndexHNSWCagra, with cuVS), so such
an index stays on the CPU and the reason is logged once per collection and kept in
:attr:`Device.fallbacks`. FAISS GPU indexes and their ``StandardGpuResources`` are not
thread-safe, even for searches (FAISS wiki, "Threads and asynchronous calls"), so one resources
object per :class:`Device` serves every collection and every call into it (cloning, searching and
freeing a GPU index) holds that device's lock. Linear query maps (``Transform.affine(side)`` is not
None) run as ``x @ W + b`` with torch on the same GPU, their weights copied there once per transform
object (:meth:`Device.apply_affine`). Covered by ``tests/test_gpu.py``; the GPU half of it is skipped
without a GPU.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from typing import Any

import faiss
import numpy as np

from .errors import FailedPrecondition
from .search_thread import SearchThread

__all__ = ["GPU_MAX_K", "Device", "GpuSearchIndex", "gpu_unsupported_reason", "inner_index"]

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  #: largest k (and nprobe) a FAISS GPU index selects (GPU_MAX_SELECTION_K)
INSTALL_HINT = "faiss-cpu installed? pip install faiss-gpu==1.15.1"
_DEVICE_RE = re.compile(r"cpu|cuda(?::(\d{1,3}))?")


def _gpu_types() -> tuple[type, ...]:
    """The CPU index classes ``index_cpu_to_gpu`` turns into a GPU index of the same semantics.
    Exact types: a subclass (IndexIVFPQR, IndexIVFFlatDedup) would lose what it adds."""
    return (
        faiss.IndexFlat,
        faiss.IndexFlatL2,
        faiss.IndexFlatIP,
        faiss.IndexIVFFlat,
        faiss.IndexIVFPQ,
        faiss.IndexIVFScalarQuantizer,
    )


def inner_index(index: Any) -> Any:
    """The index inside an IndexPreTransform (``PCA64,HNSW32``), or ``index`` itself."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index


def gpu_unsupported_reason(index: Any) -> str | None:
    """Why ``index`` (a CPU faiss.Index, maybe inside an IndexPreTransform) cannot be searched on
    a GPU, or None when ``index_cpu_to_gpu`` supports it."""
    inner = inner_index(index)
    name = type(inner).__name__
    if isinstance(inner, faiss.IndexHNSW):
        return f"{name}: FAISS has no GPU HNSW (only IndexHNSWCagra, with cuVS); searched on the CPU"
    if type(inner) is faiss.IndexScalarQuantizer and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        return None
    if type(inner) not in _gpu_types():
        return f"{name} has no FAISS GPU version (Flat, IVF*,Flat, IVF*,PQ*, IVF*,SQ* have); searched on the CPU"
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and not isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
        quantizer = type(faiss.downcast_index(ivf.quantizer)).__name__
        return f"{name} with a {quantizer} coarse quantizer: only flat quantizers copy to a GPU; searched on the CPU"
    return None


class GpuSearchIndex:
    """A GPU copy of a sealed index and the lock of the resources it lives in.

    Every use holds the lock, freeing included: ``StandardGpuResources`` books its allocations in
    an unguarded map, so a GPU index must never be freed while another thread searches.
    """

    def __init__(self, index: Any, lock: threading.RLock) -> None:
        self.index = index
        self.ntotal = int(index.ntotal)
        self._lock = lock

    def search(self, xq: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """xq : (nq, d) float32, k <= GPU_MAX_K -> D, I of shape (nq, k). No IDSelector: GPU indexes ignore it."""
        with self._lock:
            D, I = self.index.search(xq, k, params=params)
        return D, I

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                self.index = None


class Device:
    """``cpu`` or one CUDA GPU (``cuda:N``), with that GPU's shared FAISS resources and lock."""

    def __init__(self, text: str, gpu: int | None) -> None:
        self.text = text  #: as configured ("cuda" or "cuda:0"), for messages
        self.gpu = gpu  #: CUDA device number, None on the CPU
        #: owner (collection) -> why its index is searched on the CPU although the device is a GPU
        self.fallbacks: dict[str, str] = {}
        self._lock = threading.RLock()  # every FAISS call into this GPU's resources, frees included
        self._res: Any = None
        self._torch: Any = None  # torch.device once checked, False when torch has no CUDA
        self._weights: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, Any]]] = weakref.WeakKeyDictionary()
        self._state_lock = threading.Lock()  # lazy set-up and the fallback/weight caches
        #: OpenMP threads of the CPU search thread (:mod:`.search_thread`); set by the engine
        self.omp_threads = os.cpu_count() or 1
        self._search_thread: SearchThread | None = None

    @classmethod
    def parse(cls, text: str) -> Device:
        """``"cpu"``, ``"cuda"`` (GPU 0) or ``"cuda:N"``; anything else is a ValueError."""
        m = _DEVICE_RE.fullmatch(text.strip().lower()) if isinstance(text, str) else None
        if m is None:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {text!r}")
        if m.group(0) == "cpu":
            return cls(text, None)
        return cls(text, int(m.group(1) or 0))

    @property
    def is_gpu(self) -> bool:
        return self.gpu is not None

    @property
    def name(self) -> str:
        return "cpu" if self.gpu is None else f"cuda:{self.gpu}"

    def __repr__(self) -> str:
        return f"Device({self.name!r})"

    def check_available(self) -> None:
        """Raises FailedPrecondition when this is a GPU device that faiss cannot reach."""
        if self.gpu is None:
            return
        ngpu = int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
        if ngpu == 0:
            raise FailedPrecondition(f"device {self.text!r} asked for but faiss reports 0 GPUs ({INSTALL_HINT})")
        if self.gpu >= ngpu:
            raise FailedPrecondition(
                f"device {self.text!r} asked for but faiss reports {ngpu} GPU(s): cuda:0 .. cuda:{ngpu - 1}"
            )

    # -- FAISS ---------------------------------------------------------------------------------

    def search_cpu(self, index: Any, xq: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """D, I of shape (nq, k) from a CPU index: one query on the calling thread, a batch on the
        one search thread whose OpenMP team serves every batch (see :mod:`.search_thread`)."""
        if len(xq) == 1:
            return index.search(xq, k, params=params)  # type: ignore[no-any-return]
        with self._state_lock:
            if self._search_thread is None:
                self._search_thread = SearchThread(self.omp_threads)
            runner = self._search_thread
        D, I = runner.run(lambda: index.search(xq, k, params=params))
        return D, I

    def close(self) -> None:
        """Stops the search thread (a later batch starts a new one)."""
        with self._state_lock:
            runner, self._search_thread = self._search_thread, None
        if runner is not None:
            runner.close()

    def _resources(self) -> Any:
        with self._state_lock:
            if self._res is None:
                self._res = faiss.StandardGpuResources()
            return self._res

    def to_search_index(self, index: Any, owner: str = "") -> Any:
        """The index to search for the CPU index ``index``: ``index`` itself on the CPU, when empty
        or when the GPU cannot hold it (the reason logged once per ``owner``), else a
        :class:`GpuSearchIndex` over ``faiss.index_cpu_to_gpu``. ``index`` is never modified."""
        if self.gpu is None or index is None or index.ntotal == 0:
            return index
        reason = gpu_unsupported_reason(index)
        if reason is None:
            try:
                search_copy = GpuSearchIndex(self._clone_to_gpu(index), self._lock)
                with self._state_lock:
                    self.fallbacks.pop(owner, None)
                return search_copy
            except RuntimeError as err:  # e.g. a PQ code size the GPU lacks, or out of GPU memory
                lines = str(err).strip().splitlines()
                reason = f"index_cpu_to_gpu failed: {lines[-1] if lines else type(err).__name__}; searched on the CPU"
        with self._state_lock:
            first = owner not in self.fallbacks
            self.fallbacks[owner] = reason
        if first:
            log.warning("collection %s on %s: %s", owner or "?", self.name, reason)
        return index

    def _clone_to_gpu(self, index: Any) -> Any:
        """``faiss.index_cpu_to_gpu`` under this GPU's lock; default GpuClonerOptions store float32
        (useFloat16 off), so a GPU Flat index is as exact as the CPU one."""
        gpu = 0 if self.gpu is None else self.gpu  # only called on a GPU device
        res = self._resources()
        with self._lock:
            return faiss.index_cpu_to_gpu(res, gpu, index, faiss.GpuClonerOptions())

    # -- linear transforms (torch) ---------------------------------------------------------------

    def _torch_device(self) -> Any:
        """torch.device of this GPU, or None when torch cannot reach it (then maps stay in numpy)."""
        with self._state_lock:
            if self._torch is None:
                import torch  # only ever on a GPU device

                if torch.cuda.is_available() and self.gpu is not None and self.gpu < torch.cuda.device_count():
                    self._torch = torch.device("cuda", self.gpu)
                else:
                    self._torch = False
                    log.warning(
                        "torch %s has no CUDA device %s: linear transforms run in numpy", torch.__version__, self.name
                    )
            return self._torch or None

    def apply_affine(self, fn: Any, x: np.ndarray, side: str = "query") -> np.ndarray | None:
        """``x @ W + b`` on the GPU for a transform with an affine form (``fn.affine(side)``).

        x : (n, d_in) float32 -> (n, d_out) float32 numpy array, not normalized; None on the CPU,
        for a non-linear transform, or when torch has no CUDA (the caller then uses ``fn.apply``).
        """
        if self.gpu is None or fn is None:
            return None
        dev = self._torch_device()
        if dev is None:
            return None
        W, b = self._device_weights(fn, side, dev)
        if W is None:
            return None
        import torch

        x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:  # a request's frombuffer view: torch warns on read-only memory
            x = x.copy()
        xt = torch.from_numpy(x).to(dev)
        y: np.ndarray = torch.addmm(b, xt, W).cpu().numpy()
        return y

    def _device_weights(self, fn: Any, side: str, dev: Any) -> tuple[Any, Any]:
        """(W (d_in, d_out), b (d_out,)) float32 tensors on ``dev``, cached per transform object
        (weakly: a replaced transform drops its copy); (None, None) when ``fn`` is not linear."""
        with self._state_lock:
            cached = self._weights.get(fn, {}).get(side)
        if cached is not None:
            return cached
        form = fn.affine(side)
        if form is None:
            return None, None
        import torch

        W = torch.from_numpy(np.ascontiguousarray(form[0], dtype=np.float32)).to(dev)
        b = torch.from_numpy(np.ascontiguousarray(form[1], dtype=np.float32)).to(dev)
        with self._state_lock:
            self._weights.setdefault(fn, {})[side] = (W, b)
        return W, b
