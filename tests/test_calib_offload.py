"""Calibration activations in host memory (``activations_on_host``): each batch's hidden states and
per-batch layer arguments live on the host between layers and visit the compute device one batch at
a time, for the Hessian forwards and for the quantized layer's outputs.

- The quantized tensors (codes, scales, zeros, g_idx) and the per-layer errors are bit-identical with
  the option on and off, in memory and streamed (through the quantize stage's functions).
- With the option on, every forward pass reads its batch from the host store, never from a tensor
  that stayed on the device: on this CPU-only machine the host copies are forced to be distinct
  tensors, so the check holds although host and device are the same memory here.
- On CUDA (skipped elsewhere): the stored activations are pinned host tensors, and the peak GPU
  memory of the quantization is lower with the option on, for the same codes.
"""

import copy

import pytest
import torch

from lotaqaf_cli.config import compose
from lotaqaf_cli.core import quantize_model as qm
from lotaqaf_cli.core.qlinear import QuantLinear, quantized_modules
from lotaqaf_cli.stages import quantize as stage

BUFFERS = ("qweight", "scales", "zeros", "g_idx")
CONFIGS = [[], ["quant.act_order=true", "quant.true_sequential=true", "quant.bits=3", "quant.mse=0"]]


def _tensors(modules: dict) -> dict:
    return {f"{n}.{b}": getattr(m, b) for n, m in modules.items() for b in BUFFERS}


def _assert_identical(a: dict, b: dict) -> None:
    assert a and a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _all_tensors(obj) -> list[torch.Tensor]:
    found = []
    qm._map_tensors(obj, found.append)
    return found


class Traffic:
    """Counts the stores and fetches, forces every host copy to be a distinct tensor, and checks that
    each fetched batch came out of the host store (with the option on) or is the stored one (off)."""

    def __init__(self, monkeypatch):
        self.reset()
        store, fetch = qm._store, qm._fetch

        def host_copy(t, pin):
            c = t.clone()
            self.host[id(c)] = c
            return c

        def spy_store(batch, device, on_host):
            self.stores += 1
            self.stored_on_host.add(on_host)
            return store(batch, device, on_host)

        def spy_fetch(batch, device):
            self.fetches += 1
            tensors = _all_tensors(batch)
            assert tensors and all(t.device.type == "cpu" for t in tensors)
            from_host = [id(t) in self.host for t in tensors]
            assert all(from_host) or not any(from_host), "a batch partly on the device"
            self.from_host.add(from_host[0])
            return fetch(batch, device)

        monkeypatch.setattr(qm, "_host_copy", host_copy)
        monkeypatch.setattr(qm, "_store", spy_store)
        monkeypatch.setattr(qm, "_fetch", spy_fetch)

    def reset(self):
        self.host: dict[int, torch.Tensor] = {}   # id -> host copy (kept alive, so ids stay unique)
        self.fetches = self.stores = 0
        self.stored_on_host: set[bool] = set()
        self.from_host: set[bool] = set()          # per fetch: did the batch come out of a host copy?


def _expected_traffic(quant, n_batches: int, n_layers: int) -> tuple[int, int]:
    groups = len(qm.SEQUENTIAL_GROUPS) if quant.true_sequential else 1
    return n_layers * (groups + 1) * n_batches, n_batches + n_layers * n_batches   # fetches, stores


@pytest.mark.parametrize("extra", CONFIGS)
def test_in_memory_codes_identical_with_activations_on_host(smoke, calib_ids, monkeypatch, extra):
    quant = compose(["recipe=smoke", *extra]).quant
    n_batches, n_layers = len(calib_ids.split(quant.batch_size)), len(smoke.model.layers)
    assert n_batches > 1
    traffic = Traffic(monkeypatch)
    off, stats_off = stage.quantize(smoke, calib_ids, quant, torch.device("cpu"))
    # off: the activations stay where they were computed, each forward gets the stored tensors themselves
    assert (traffic.fetches, traffic.stores) == _expected_traffic(quant, n_batches, n_layers)
    assert traffic.stored_on_host == {False} and traffic.from_host == {False} and not traffic.host
    traffic.reset()
    on, stats_on = stage.quantize(smoke, calib_ids, quant, torch.device("cpu"), activations_on_host=True)
    _assert_identical(_tensors(quantized_modules(off)), _tensors(quantized_modules(on)))
    assert [s.__dict__ for s in stats_off] == [s.__dict__ for s in stats_on]
    assert (traffic.fetches, traffic.stores) == _expected_traffic(quant, n_batches, n_layers)
    assert traffic.stored_on_host == {True} and traffic.from_host == {True}


def _streamed(source, calib_ids, quant, on_host: bool) -> tuple[dict, list]:
    skeleton = copy.deepcopy(source)
    out: dict = {}

    def emit(i, layer):
        out.update({f"model.layers.{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, QuantLinear)})

    stats = stage.quantize_streamed(skeleton, lambda i: copy.deepcopy(source.model.layers[i]), emit, calib_ids,
                                    quant, torch.device("cpu"), activations_on_host=on_host)
    return _tensors(out), [s.__dict__ for s in stats]


@pytest.mark.parametrize("extra", CONFIGS)
def test_streamed_codes_identical_with_activations_on_host(smoke, calib_ids, monkeypatch, extra):
    quant = compose(["recipe=smoke", *extra]).quant
    off, stats_off = _streamed(smoke, calib_ids, quant, False)
    traffic = Traffic(monkeypatch)
    on, stats_on = _streamed(smoke, calib_ids, quant, True)
    _assert_identical(off, on)
    assert stats_off == stats_on
    n_batches = len(calib_ids.split(quant.batch_size))
    assert (traffic.fetches, traffic.stores) == _expected_traffic(quant, n_batches, len(smoke.model.layers))
    assert traffic.stored_on_host == {True} and traffic.from_host == {True}


@pytest.mark.cuda
def test_cuda_activations_on_host_pinned_lower_peak_same_codes():
    from lotaqaf_cli.io.models import smoke_model

    quant = compose(["recipe=smoke"]).quant
    s = stage.settings(quant)
    dev = torch.device("cuda")
    ids = torch.randint(3, 256, (512, 128), generator=torch.Generator().manual_seed(0))   # 16 MB of fp32 activations
    batches = list(ids.split(8))

    stored = qm.capture_first_layer_inputs(smoke_model(seed=0).to(dev), batches[:2], dev, activations_on_host=True)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in _all_tensors(stored))

    peaks, codes = {}, {}
    for on_host in (False, True):
        model = smoke_model(seed=0).to(dev)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        qm.quantize_model(model, batches, device=dev, activations_on_host=on_host, **s)
        torch.cuda.synchronize()
        peaks[on_host] = torch.cuda.max_memory_allocated() - base
        codes[on_host] = {k: v.cpu() for k, v in _tensors(quantized_modules(model)).items()}
        del model
    _assert_identical(codes[False], codes[True])
    assert peaks[True] < peaks[False] - 8 * 2**20, peaks
