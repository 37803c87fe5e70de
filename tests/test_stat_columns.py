"""The cube's read of the stats arena (recon_fast._C.copy_stat_columns): the columns asked for,
row after row, and whether every energy is finite, against numpy's gather; its refusals; and the
Tracer's cube through it and through the numpy path it replaces (a library without it)."""

import numpy as np
import pytest
import torch

from recon_fast import Tracer
from recon_fast.kernels import token_stats as ops
from recon_fast.trace import stats_capture

from tiny_models import VOCAB, make_model

copy_stat_columns = ops.copy_stat_columns
needs_library = pytest.mark.skipif(copy_stat_columns is None, reason="no compiled copy_stat_columns")

COLUMN_CHOICES = [[0, 1, 2, 3, 4], [0], [4], [1, 2], [0, 3, 4], [4, 0, 2], [2, 2]]


@needs_library
@pytest.mark.parametrize("columns", COLUMN_CHOICES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 365 * 8])
def test_columns_are_numpys_gather(columns, rows):
    src = torch.randn(rows, 5, generator=torch.Generator().manual_seed(rows))
    out = np.full((rows, len(columns)), -1.0, dtype=np.float32)
    assert copy_stat_columns(src, out, columns) is True
    np.testing.assert_array_equal(out, src.numpy()[:, columns])


@needs_library
@pytest.mark.parametrize("columns", [[0, 1, 2, 3, 4], [1, 2]], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_energy_is_reported_and_copied(columns, bad):
    src = torch.rand(40, 5) + 1
    src[37, 0] = bad  # energy: reported, also when the energy column is not among those copied
    out = np.empty((4, 1, 10, len(columns)), dtype=np.float32)  # the cube's [layers, batch, tokens, metrics]
    assert copy_stat_columns(src, out, columns) is False
    np.testing.assert_array_equal(out.reshape(40, -1), src.numpy()[:, columns])


@needs_library
def test_non_finite_values_outside_the_energy_do_not_count():
    # Energy is NaN or Inf exactly when the row is (token_stats): the other columns are not read.
    src = torch.rand(6, 5)
    src[2, 1:] = float("nan")
    assert copy_stat_columns(src, np.empty((6, 5), np.float32), [0, 1, 2, 3, 4]) is True


@needs_library
@pytest.mark.parametrize("make, message", [
    (lambda: (torch.zeros(4, 5, dtype=torch.float64), np.empty((4, 5), np.float32)), "float32 CPU"),
    (lambda: (torch.zeros(5, 4).t(), np.empty((4, 5), np.float32)), "contiguous"),
    (lambda: (torch.zeros(4, 6), np.empty((4, 6), np.float32)), r"\[n, 5\]"),
    (lambda: (torch.zeros(4, 5), np.empty((4, 5), np.float64)), "float32, got format"),
    (lambda: (torch.zeros(4, 5), np.empty((5, 4), np.float32).T), "C-contiguous"),
    (lambda: (torch.zeros(4, 5), np.empty((3, 5), np.float32)), r"holds 15 values, not 20 \(4 rows of 5 columns\)"),
])
def test_bad_arguments_are_named(make, message):
    src, out = make()
    with pytest.raises(RuntimeError, match=message):
        copy_stat_columns(src, out, [0, 1, 2, 3, 4])


@needs_library
@pytest.mark.parametrize("columns, message", [([5], r"column 5 is not in \[0, 5\)"), ([-1], "column -1"),
                                              ([], "no columns")])
def test_bad_columns_are_named(columns, message):
    with pytest.raises(RuntimeError, match=message):
        copy_stat_columns(torch.zeros(2, 5), np.empty((2, max(len(columns), 1)), np.float32), columns)


def test_a_read_only_out_is_refused():
    if copy_stat_columns is None:
        pytest.skip("no compiled copy_stat_columns")
    out = np.empty((2, 5), np.float32)
    out.flags.writeable = False
    with pytest.raises((BufferError, ValueError, RuntimeError)):
        copy_stat_columns(torch.zeros(2, 5), out, [0, 1, 2, 3, 4])


@pytest.mark.parametrize("metrics", [("energy", "mean", "std", "min", "max"), ("std", "max"), ("max", "energy")])
def test_the_cube_is_the_same_through_the_library_and_through_numpy(monkeypatch, metrics):
    model = make_model("llama")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # padding: NaN in the cube either way

    def poison(module, inputs, output):  # NaN at token 4 from the second layer on
        output = output.clone()
        output[:, 4] = float("nan")
        return output

    handle = model.model.layers[1].register_forward_hook(poison)
    cubes, warned = [], []
    try:
        for reader in (copy_stat_columns, None):
            monkeypatch.setattr(stats_capture, "copy_stat_columns", reader)
            with Tracer(model, metrics=metrics) as tracer:
                tracer.add_hooks_all()
                with pytest.warns(UserWarning, match="non-finite") as record:
                    tracer.run({"input_ids": ids, "attention_mask": mask})
                cubes.append(tracer.cube)
                warned.append([str(w.message) for w in record])
    finally:
        handle.remove()
    ours, numpys = cubes
    np.testing.assert_array_equal(ours.data, numpys.data)
    assert ours.meta["nonfinite"] == numpys.meta["nonfinite"]
    assert ours.meta["nonfinite"]["layer_name"] == "model.layers.1" and ours.meta["nonfinite"]["token"] == 4
    assert warned[0] == warned[1]
    assert np.isnan(ours.data[:, 1, :2]).all() and np.isfinite(ours.data[0, :, 2:]).all()
