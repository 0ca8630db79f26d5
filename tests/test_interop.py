"""from_torch / to_torch_state_dict: NumPy state dicts always, PyTorch's own
BatchNorm*d as an oracle where torch is installed."""

import sys

import keras
import numpy as np
import pytest

from keras_bn import BatchNorm
from keras_bn import from_torch
from keras_bn import to_torch_state_dict
from tests.reference import np_batch_norm, random_params

# Float32 inference is x * a + b against PyTorch's (x - mean) / sqrt(var + eps)
# * w + b: a few float32 ulps apart on O(1) outputs.
F32_TOL = 1e-5


def _state_dict(channels=3, seed=0, prefix=""):
    weight, bias, mean, var = (p.astype(np.float32) for p in random_params(channels, seed))
    return {
        f"{prefix}weight": weight, f"{prefix}bias": bias, f"{prefix}running_mean": mean,
        f"{prefix}running_var": var, f"{prefix}num_batches_tracked": np.array(7, np.int64),
    }


def test_hand_computed_inference():
    # var + eps = 4 exactly (eps a power of two), so each output is
    # weight * (x - mean) / 2 + bias.
    eps = 2.0 ** -10
    layer = from_torch({"weight": np.array([2.0, 0.5]), "bias": np.array([1.0, -1.0]),
                        "running_mean": np.array([1.0, 2.0]),
                        "running_var": np.array([4.0 - eps, 4.0 - eps])}, epsilon=eps)
    y = layer(np.array([[3.0, 6.0], [1.0, 0.0]], np.float32))
    np.testing.assert_allclose(y, [[3.0, 0.0], [1.0, -1.5]], rtol=1e-7)


def test_state_dict_becomes_the_layer_weights():
    state = _state_dict(prefix="features.1.")
    layer = from_torch(state, name="bn1")
    assert isinstance(layer, BatchNorm) and layer.built and layer.name == "bn1"
    assert (layer.axis, layer.momentum, layer.epsilon) == (1, 0.9, 1e-5)  # PyTorch's defaults
    for variable, key in zip(layer.weights, ["weight", "bias", "running_mean", "running_var"]):
        np.testing.assert_array_equal(variable.numpy(), state["features.1." + key])


@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((4, 3, 5), 1), ((2, 3, 4, 5), 1),
                                        ((2, 3, 2, 2, 2), 1), ((2, 4, 4, 3), -1)])
def test_any_rank_with_channels_on_axis(shape, axis):
    state = _state_dict()
    layer = from_torch(state, axis=axis)
    x = np.random.RandomState(1).normal(0.5, 2.0, shape).astype(np.float32)
    want, _, _ = np_batch_norm(x, state["weight"], state["bias"], state["running_mean"],
                               state["running_var"], training=False, axis=axis)
    np.testing.assert_allclose(layer(x), want, rtol=F32_TOL, atol=F32_TOL)


class _FakeModule:
    """What from_torch reads of a torch module: state_dict(), momentum, eps."""

    def __init__(self, state, momentum=0.1, eps=1e-5):
        self._state, self.momentum, self.eps = state, momentum, eps

    def state_dict(self):
        return dict(self._state)


def test_module_momentum_and_eps_are_converted():
    layer = from_torch(_FakeModule(_state_dict(), momentum=0.25, eps=1e-3))
    assert (layer.momentum, layer.epsilon) == (0.75, 1e-3)
    layer = from_torch(_FakeModule(_state_dict(), momentum=None), momentum=0.5, epsilon=0.125)
    assert (layer.momentum, layer.epsilon) == (0.5, 0.125)


def test_affine_false_has_no_gamma_or_beta():
    state = {k: v for k, v in _state_dict().items() if k not in ("weight", "bias")}
    layer = from_torch(state, axis=-1)
    assert (layer.center, layer.scale, layer.gamma, layer.beta) == (False, False, None, None)
    assert to_torch_state_dict(layer, as_numpy=True).keys() == {
        "running_mean", "running_var", "num_batches_tracked"}


def test_to_torch_state_dict_round_trip():
    state = _state_dict()
    exported = to_torch_state_dict(from_torch(state), num_batches_tracked=7, as_numpy=True)
    assert list(exported) == ["weight", "bias", "running_mean", "running_var",
                              "num_batches_tracked"]
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value)
        assert exported[key].dtype == value.dtype


def test_to_torch_state_dict_fills_a_missing_scale_or_offset():
    layer = BatchNorm(scale=False)
    layer.build((None, 2))
    layer.beta.assign([1.0, -1.0])
    exported = to_torch_state_dict(layer, as_numpy=True)
    np.testing.assert_array_equal(exported["weight"], [1.0, 1.0])
    np.testing.assert_array_equal(exported["bias"], [1.0, -1.0])
    assert exported["num_batches_tracked"] == 0


def test_to_torch_state_dict_of_a_keras_layer():
    keras_layer = keras.layers.BatchNormalization()
    keras_layer.build((None, 3))
    keras_layer.set_weights([p.astype(np.float32) for p in random_params(3)])
    exported = to_torch_state_dict(keras_layer, as_numpy=True)
    for value, key in zip(keras_layer.get_weights(), ["weight", "bias", "running_mean",
                                                      "running_var"]):
        np.testing.assert_array_equal(exported[key], value)


def _message(call):
    with pytest.raises((ValueError, TypeError, ImportError)) as info:
        call()
    return str(info.value)


def test_from_torch_errors_name_the_argument():
    assert _message(lambda: from_torch({"bn.weight": np.ones(2), "bn.running_var": np.ones(2)})) == (
        "from_torch: argument `state_dict_or_module` must have both bn.running_mean and "
        "bn.running_var, or neither (track_running_stats=False); received bn.running_var alone.")
    assert _message(lambda: from_torch({"num_batches_tracked": np.array(3)})) == (
        "from_torch: argument `state_dict_or_module` must hold a batch-norm layer's entries "
        "(weight, bias, running_mean, running_var); received num_batches_tracked.")
    both = {**_state_dict(prefix="bn1."), **_state_dict(prefix="bn2.")}
    assert _message(lambda: from_torch(both)) == (
        "from_torch: argument `state_dict_or_module` must hold one batch-norm layer's "
        "entries; received keys with the prefixes 'bn1.', 'bn2.'. Select one layer, e.g. "
        "{k: v for k, v in state_dict.items() if k.startswith('bn1.')}.")
    assert _message(lambda: from_torch({**_state_dict(), "scale": np.ones(3)})) == (
        "from_torch: argument `state_dict_or_module` must hold the entries weight, bias, "
        "running_mean, running_var, num_batches_tracked of a batch-norm layer; received the "
        "unexpected entries scale.")
    assert _message(lambda: from_torch({**_state_dict(), "running_mean": np.zeros(4)})) == (
        "from_torch: argument `state_dict_or_module` must have entries of one shape (C,); "
        "received running_mean of shape (4,) and running_var of shape (3,).")
    assert _message(lambda: from_torch([1.0, 2.0])) == (
        "from_torch: argument `state_dict_or_module` must be a torch batch-norm module or a "
        "mapping of names to tensors; received list.")


def test_to_torch_state_dict_errors(monkeypatch):
    assert _message(lambda: to_torch_state_dict(keras.layers.Dense(2))) == (
        "to_torch_state_dict: argument `layer` must be a keras_bn.BatchNorm or "
        "keras.layers.BatchNormalization; received Dense.")
    assert _message(lambda: to_torch_state_dict(BatchNorm(name="bn"))) == (
        "to_torch_state_dict: argument `layer` must be built; received 'bn', which has no "
        "weights yet.")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    assert _message(lambda: to_torch_state_dict(from_torch(_state_dict()))) == (
        "to_torch_state_dict: torch tensors need PyTorch, which is not installed; pass "
        "as_numpy=True for NumPy arrays.")


# PyTorch itself as the oracle, where installed.

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _trained_module(torch, cls=None, channels=3, shape=(8, 3, 5, 5), **kwargs):
    """A torch batch norm with non-default weights and running statistics."""
    torch.manual_seed(0)
    module = (cls or torch.nn.BatchNorm2d)(channels, **kwargs)
    module.train()
    for _ in range(3):
        module(torch.randn(*shape) * 2.0 + 0.5)
    if module.affine:
        with torch.no_grad():
            module.weight.uniform_(0.5, 2.0)
            module.bias.uniform_(-1.0, 1.0)
    return module.eval()


def _torch_out(torch, module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("momentum,eps", [(0.1, 1e-5), (0.3, 1e-3)])
def test_matches_torch_batchnorm2d_eval(torch, momentum, eps):
    module = _trained_module(torch, momentum=momentum, eps=eps)
    x = np.random.RandomState(2).normal(0.5, 2.0, (4, 3, 6, 6)).astype(np.float32)
    for source in (module, module.state_dict()):
        layer = from_torch(source) if source is module else from_torch(source, epsilon=eps)
        np.testing.assert_allclose(layer(x), _torch_out(torch, module, x), rtol=F32_TOL,
                                   atol=F32_TOL)
    assert from_torch(module).momentum == pytest.approx(1 - momentum, abs=1e-15)


def test_one_state_dict_serves_1d_2d_and_3d(torch):
    state = _trained_module(torch).state_dict()
    layer = from_torch(state)
    rng = np.random.RandomState(3)
    for cls, shape in [(torch.nn.BatchNorm1d, (4, 3)), (torch.nn.BatchNorm1d, (4, 3, 7)),
                       (torch.nn.BatchNorm2d, (4, 3, 5, 5)),
                       (torch.nn.BatchNorm3d, (2, 3, 3, 3, 3))]:
        module = cls(3).eval()
        module.load_state_dict(state)
        x = rng.normal(0.5, 2.0, shape).astype(np.float32)
        np.testing.assert_allclose(layer(x), _torch_out(torch, module, x), rtol=F32_TOL,
                                   atol=F32_TOL)


def test_affine_false_module(torch):
    module = _trained_module(torch, affine=False)
    layer = from_torch(module)
    x = np.random.RandomState(4).normal(0.5, 2.0, (4, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(layer(x), _torch_out(torch, module, x), rtol=F32_TOL,
                               atol=F32_TOL)


def test_exported_state_dict_loads_strictly_into_torch(torch):
    layer = BatchNorm(axis=1, momentum=0.8, epsilon=1e-3)
    layer.build((None, 3, None, None))
    layer.set_weights([p.astype(np.float32) for p in random_params(3, seed=5)])
    module = torch.nn.BatchNorm2d(3, eps=layer.epsilon, momentum=1 - layer.momentum).eval()
    module.load_state_dict(to_torch_state_dict(layer, num_batches_tracked=12), strict=True)
    assert module.num_batches_tracked.item() == 12
    x = np.random.RandomState(6).normal(0.5, 2.0, (4, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_torch_out(torch, module, x), layer(x), rtol=F32_TOL,
                               atol=F32_TOL)


def test_torch_cumulative_average_carries_over_and_keeps_training_alike(torch):
    # momentum=None in both: the mean of all batch statistics, with the
    # step count carried across and PyTorch's unbiased running variance.
    module = _trained_module(torch, momentum=None)
    layer = from_torch(module)
    assert layer.momentum is None and layer.unbiased_moving_variance
    assert int(layer.num_batches_tracked.numpy()) == int(module.num_batches_tracked)
    module.train()
    rng = np.random.RandomState(8)
    for _ in range(2):
        x = rng.normal(0.5, 2.0, (4, 3, 2, 2)).astype(np.float32)
        module(torch.from_numpy(x))
        layer(x, training=True)
    exported = to_torch_state_dict(layer, as_numpy=True)
    # float32 EMA arithmetic in two libraries: a few ulps.
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(exported[key], getattr(module, key).detach().numpy(),
                                   rtol=F32_TOL, atol=F32_TOL)
    assert int(exported["num_batches_tracked"]) == int(module.num_batches_tracked)


def test_weight_without_bias_is_scale_without_center():
    state = {k: v for k, v in _state_dict().items() if k != "bias"}
    layer = from_torch(state)
    assert (layer.scale, layer.center, layer.beta) == (True, False, None)
    np.testing.assert_array_equal(layer.gamma.numpy(), state["weight"])
    x = np.random.RandomState(9).normal(0.5, 2.0, (4, 3)).astype(np.float32)
    want, _, _ = np_batch_norm(x, state["weight"], None, state["running_mean"],
                               state["running_var"], training=False, axis=1)
    np.testing.assert_allclose(layer(x), want, rtol=F32_TOL, atol=F32_TOL)


def test_num_batches_tracked_carried_for_every_momentum():
    layer = from_torch(_state_dict())  # momentum 0.9, num_batches_tracked 7
    assert layer.track_num_batches and int(layer.num_batches_tracked.numpy()) == 7
    x = np.random.RandomState(10).normal(0.5, 2.0, (4, 3)).astype(np.float32)
    layer(x, training=True)
    layer(x, training=True)
    assert int(to_torch_state_dict(layer, as_numpy=True)["num_batches_tracked"]) == 9
    # Without one in the state dict the layer keeps Keras's four weights.
    state = {k: v for k, v in _state_dict().items() if k != "num_batches_tracked"}
    assert len(from_torch(state).weights) == 4


def test_state_dict_without_running_statistics_tracks_none():
    state = {k: _state_dict()[k] for k in ("weight", "bias")}
    layer = from_torch(state)
    assert not layer.track_running_stats and len(layer.weights) == 2
    x = np.random.RandomState(11).normal(0.5, 2.0, (6, 3)).astype(np.float32)
    # Batch statistics in inference too.
    want, _, _ = np_batch_norm(x, state["weight"], state["bias"], np.zeros(3), np.ones(3),
                               training=True, axis=1)
    np.testing.assert_allclose(layer(x), want, rtol=F32_TOL, atol=F32_TOL)
    assert to_torch_state_dict(layer, as_numpy=True).keys() == {"weight", "bias"}


def test_track_running_stats_false_matches_torch_in_train_and_eval(torch):
    module = torch.nn.BatchNorm2d(3, track_running_stats=False)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
        module.bias.uniform_(-1.0, 1.0)
    layer = from_torch(module)
    assert not layer.track_running_stats
    x = np.random.RandomState(12).normal(0.5, 2.0, (4, 3, 5, 5)).astype(np.float32)
    for mode in ("train", "eval"):
        getattr(module, mode)()
        np.testing.assert_allclose(layer(x, training=mode == "train"),
                                   _torch_out(torch, module, x), rtol=F32_TOL, atol=F32_TOL)
    fresh = torch.nn.BatchNorm2d(3, track_running_stats=False)
    fresh.load_state_dict(to_torch_state_dict(layer), strict=True)
    np.testing.assert_array_equal(fresh.weight.detach().numpy(), layer.gamma.numpy())


def test_weight_without_bias_module_matches_torch(torch):
    module = _trained_module(torch)
    module.bias = None  # a BatchNorm with a scale and no offset
    layer = from_torch(module)
    assert layer.scale and not layer.center
    x = np.random.RandomState(13).normal(0.5, 2.0, (4, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(layer(x), _torch_out(torch, module, x), rtol=F32_TOL,
                               atol=F32_TOL)


def test_num_batches_tracked_follows_torch_with_momentum(torch):
    module = torch.nn.BatchNorm2d(3, momentum=0.1).train()
    layer = from_torch(module)
    rng = np.random.RandomState(14)
    for _ in range(3):
        x = rng.normal(0.5, 2.0, (4, 3, 2, 2)).astype(np.float32)
        module(torch.from_numpy(x))
        layer(x, training=True)
    assert int(to_torch_state_dict(layer)["num_batches_tracked"]) == int(
        module.num_batches_tracked) == 3


def test_reset_running_stats_matches_torch(torch):
    module = _trained_module(torch)
    layer = from_torch(module)
    module.reset_running_stats()
    layer.reset_running_stats()
    exported = to_torch_state_dict(layer, as_numpy=True)
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(exported[key], value.numpy())


def test_half_and_double_precision_modules(torch):
    module = _trained_module(torch)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        state = module.to(dtype).state_dict()
        layer = from_torch(state)
        for variable, key in zip(layer.weights, ["weight", "bias", "running_mean",
                                                 "running_var"]):
            # float32 holds every bfloat16/float16 value; float64 rounds once.
            np.testing.assert_array_equal(variable.numpy(),
                                          state[key].float().numpy())


def test_training_follows_torch_step_for_step(torch):
    # Same batches, converted momentum, PyTorch's unbiased running variance
    # (from_torch's default): equal outputs and running statistics.
    module = torch.nn.BatchNorm2d(3).train()
    layer = from_torch(module)
    rng = np.random.RandomState(7)
    for _ in range(3):
        x = rng.normal(0.5, 2.0, (4, 3, 2, 2)).astype(np.float32)
        np.testing.assert_allclose(layer(x, training=True), _torch_out(torch, module, x),
                                   rtol=F32_TOL, atol=F32_TOL)
    exported = to_torch_state_dict(layer, as_numpy=True)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(exported[key], getattr(module, key).detach().numpy(),
                                   rtol=F32_TOL, atol=F32_TOL)


def test_biased_layer_stores_the_biased_variance(torch):
    # With unbiased_moving_variance=False the running variances differ only
    # in PyTorch's n / (n - 1) on each batch's contribution (the initial 1
    # decays as 0.9 ** steps in both).
    module = torch.nn.BatchNorm2d(3).train()
    layer = from_torch(module, unbiased_moving_variance=False)
    rng = np.random.RandomState(7)
    shape, steps = (4, 3, 2, 2), 3
    for _ in range(steps):
        x = rng.normal(0.5, 2.0, shape).astype(np.float32)
        layer(x, training=True)
        _torch_out(torch, module, x)
    exported = to_torch_state_dict(layer, as_numpy=True)
    n = shape[0] * shape[2] * shape[3]
    decay = 0.9 ** steps
    np.testing.assert_allclose((module.running_var.numpy() - decay),
                               (exported["running_var"] - decay) * n / (n - 1),
                               rtol=F32_TOL, atol=F32_TOL)
