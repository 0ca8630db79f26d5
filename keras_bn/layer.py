"""The `BatchNorm` Keras layer: weights, config and the moving-average updates.

A call checks its input (`checks`), has `dispatch` normalize it with batch
or moving statistics, and writes the moving statistics back by the rule in
`ops`. The math and the choice of kernel live in those modules.
"""

import keras

from keras import ops as K

from keras_bn import backend
from keras_bn import checks
from keras_bn import dispatch
from keras_bn import ops
from keras_bn import private_api

_STATISTICS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
               "renorm_stddev", "num_batches_tracked", "renorm_steps")


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNorm(keras.layers.Layer):
    """Batch normalization (Ioffe & Szegedy, 2015) for the TensorFlow backend.

    Normalizes each channel along `axis` to zero mean and unit variance, then
    scales by `gamma` and shifts by `beta`:
    `y = gamma * (x - mean) / sqrt(var + epsilon) + beta`.

    **During training** (`fit()`, or a call with `training=True`), `mean` and
    `var` are the mean and the biased variance of the current batch over every
    axis but `axis` (N for Dense outputs, N·H·W for Conv2D outputs), and the
    moving statistics are updated once per call:
    `moving = momentum * moving + (1 - momentum) * batch`.

    **During inference** (`predict()`, `evaluate()`, a plain call, or
    `training=False`), `mean` and `var` are `moving_mean` and
    `moving_variance`; nothing is updated.

    **`trainable=False`** freezes the layer *and* runs it in inference mode
    whatever `training` says, as `keras.layers.BatchNormalization` does: the
    usual choice when fine-tuning a pretrained model on little data.

    The defaults, momentum 0.9 and epsilon 1e-5, are those of the reference
    formulation (and PyTorch's, whose momentum 0.1 weighs the *new* batch).
    `keras.layers.BatchNormalization` defaults to momentum 0.99 and epsilon
    1e-3; pass those to reproduce it. With the same momentum and epsilon the
    two layers compute the same thing and share the weight order
    `[gamma, beta, moving_mean, moving_variance]`, so `get_weights()` /
    `set_weights()` carry over between them.

    Weights are float32 under the "mixed_float16" and "mixed_bfloat16"
    policies (and under plain float16/bfloat16 ones); statistics of
    half-precision inputs are computed in float32 and the output has the
    layer's compute dtype. Integer and bool inputs are cast to the compute
    dtype, as in Keras's layer.

    Args:
        axis: Integer, the channel axis (e.g. `-1` after a channels-last
            `Conv2D`, `1` after a channels-first one). The input may have any
            rank >= 2; only the channel size is fixed at build time. Or a
            list of integers, as in tf_keras: statistics per position of
            those axes, reduced over all the others (`axis=[1, 2]` keeps a
            mean per (d1, d2)). The input's rank is then fixed at build
            time, negative entries are resolved against it, and each weight
            has the shape of the sizes on the axes in increasing order,
            `(d1, d2)`; tf_keras keeps the same values in a broadcast shape,
            `(1, d1, d2)` (with an extra 1 under `virtual_batch_size`), so
            `np.reshape(w, layer.gamma.shape)` carries its weights across.
            The compact shape doesn't depend on the rank or on ghost
            batches. A one-entry list is its integer (`axis=[3]` is
            `axis=3`, and is saved as `3`). The list must name each axis
            once, within the rank, not every axis, and not the batch axis 0
            with `virtual_batch_size`. `to_keras`, `fold_batch_norms` and
            the PyTorch functions take a single axis only.
        momentum: Weight of the old value in the moving averages, in [0, 1].
            None keeps a cumulative average instead, the plain mean of every
            batch statistic seen so far (PyTorch's `momentum=None`), counted
            by a non-trainable `num_batches_tracked` weight saved with the
            others.
        epsilon: Small float > 0 added to the variance.
        center: If True, add the offset `beta`.
        scale: If True, multiply by `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for `moving_mean`.
        moving_variance_initializer: Initializer for `moving_variance`.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        fused: None (default) picks, per call, the faster of TensorFlow's
            fused batch-norm kernel (CPU, cuDNN on GPU) and plain TF ops:
            the kernel for channels-last inputs (any layout on a GPU) outside
            XLA; TF ops for float64 inputs, channels-first inputs on a CPU
            and inside `jit_compile=True` functions, where XLA fuses them.
            True requires the kernel: it can't be combined with `renorm`,
            `virtual_batch_size`, `synchronized=True` or `adjustment` (a
            ValueError here) or a training-mode `mask` (a ValueError at the
            call), and it raises at the call for a float64 input. False
            always uses TF ops. The function computed is the same.
        synchronized: If True, in a multi-replica `tf.distribute` step
            (`MirroredStrategy`, `MultiWorkerMirroredStrategy`) normalize
            with the statistics of the global batch, merged from every
            replica's count, mean and variance in one all-reduce, so a
            partial or empty replica batch weighs what it holds. Without a
            strategy it changes nothing. With either setting the moving
            statistics are identical on all replicas after every step: from
            the global statistics when synchronized, otherwise from the
            count-weighted mean of the replicas' means and variances.
        renorm: If True, use Batch Renormalization (Ioffe, 2017): in
            training, normalize with the batch statistics and correct by
            `r = std_batch / std_renorm` and `d = (mean_batch - mean_renorm)
            / std_renorm`, both treated as constants by the gradient and
            clipped by `renorm_clipping`, where `mean_renorm`/`std_renorm`
            are extra moving averages (weights `renorm_mean`,
            `renorm_stddev`) kept with `renorm_momentum`. As in the paper
            and Keras 3, inference normalizes by a moving average of the
            batch stddev (weight `moving_stddev`, with `momentum`);
            `moving_variance` is kept equal to `moving_stddev**2 -
            epsilon`, so inference is plain batch norm with
            `moving_mean`/`moving_variance`. The weights are Keras's, in
            Keras's order, so `get_weights()`/`set_weights()` carry over
            between the two layers with renorm too.
        renorm_clipping: Dict with optional keys "rmax", "rmin", "dmax"
            (r in [rmin, rmax], d in [-dmax, dmax]; a missing key means no
            bound). Each value is a number, a Keras
            `LearningRateSchedule` or a callable of the training step (the
            `renorm_steps` weight), for the warm-up the paper recommends
            (r and d start at 1 and 0 and widen); only then does the layer
            keep a `renorm_steps` weight, after Keras's seven.
        renorm_momentum: Momentum of `renorm_mean`/`renorm_stddev`.
        virtual_batch_size: If set, Ghost Batch Normalization: in training
            the batch axis (0) is split into consecutive sub-batches of this
            size (examples 0..v-1, v..2v-1, ...), each normalized with its
            own statistics; the moving statistics follow the mean of the
            sub-batch statistics. The batch size must be a multiple.
        unbiased_moving_variance: If True, the moving variance follows the
            unbiased n / (n - 1) batch variance, as PyTorch's running
            variance does (normalization still uses the biased one). With
            one value per channel (n = 1) that is infinite, so the update
            is skipped (see `guard_bad_batches`).
        guard_bad_batches: If True (default), a training batch whose
            statistics are not finite (NaN/Inf in the batch) or that has no
            values (an empty or fully masked batch) leaves every moving
            statistic exactly as it was; the output is whatever the math
            gives. `refused_batches` counts such batches (a monitoring
            counter, not a weight: it is not saved). A batch with one
            value per channel is allowed: its variance is 0.
        track_running_stats: If False, there are no moving statistics:
            the layer normalizes with the batch's statistics in training and
            in inference alike, as PyTorch's `track_running_stats=False`
            (used by test-time adaptation). Its weights are then only
            `gamma` and `beta`.
        track_num_batches: If True, a non-trainable int64 weight
            `num_batches_tracked` counts the training batches the moving
            statistics followed, as PyTorch's buffer of that name does
            (`from_torch` sets it when the state dict has one). Always kept
            with `momentum=None`, whose average it drives.
        adjustment: tf_keras's argument. None (default), or a callable
            taking the input's dynamic shape (`tf.shape(inputs)`, a 1-D int
            tensor) and returning a pair `(scale, bias)` applied to the
            normalized values before `gamma` and `beta`, in training only:
            `y = gamma * (scale * x_hat + bias) + beta`, with `x_hat * r +
            d` for `x_hat` under `renorm`. Each of scale and bias has shape
            (C,), (1,) or () (a ValueError otherwise). For `axis=-1`,
            `lambda shape: (tf.random.uniform(shape[-1:], 0.93, 1.07),
            tf.random.uniform(shape[-1:], -0.1, 0.1))` scales each channel
            by up to 7% up or down and shifts it by up to 0.1. Inference
            ignores it, the moving statistics are those without it, and
            gradients reach whatever the pair depends on. As in tf_keras it
            doesn't combine with `virtual_batch_size` or `fused=True` (a
            ValueError here). The config saves it by Keras's rules for
            functions: one registered with
            `keras.saving.register_keras_serializable` reloads by name, a
            lambda only with `safe_mode=False`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of rank >= 2 with the built number of channels on
            `axis`; for a list of axes, of the built rank with the built
            sizes on them.
        training: Python bool, or a scalar bool tensor inside `tf.function`
            (both branches are traced once). None (the default outside
            `fit()`) means inference.
        mask: Optional bool tensor, with Keras's conventions: broadcastable
            to `inputs`, or of rank one less, lacking the last axis (as
            `Masking` and `Embedding(mask_zero=True)` give it, whatever
            `axis` is). In training, False positions are left out of the
            batch statistics; every position is normalized. Inference
            ignores it. Passed on to the next layer unchanged.

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Ioffe, 2017: Batch Renormalization](https://arxiv.org/abs/1702.03275).
        - [Hoffer et al., 2017: Ghost Batch Normalization](
          https://arxiv.org/abs/1705.08741).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.9,
        epsilon=1e-5,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        fused=None,
        synchronized=False,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        virtual_batch_size=None,
        unbiased_moving_variance=False,
        guard_bad_batches=True,
        track_running_stats=True,
        track_num_batches=False,
        adjustment=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        caller = self._caller
        self.axis = checks.axis(axis, caller)
        self.momentum = (
            None if momentum is None else checks.momentum(momentum, caller))
        self.epsilon = checks.epsilon(epsilon, caller)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(
            moving_mean_initializer
        )
        self.moving_variance_initializer = keras.initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.fused = checks.fused(fused, caller)
        self.synchronized = bool(synchronized)
        self.renorm = bool(renorm)
        self.renorm_clipping = checks.renorm_clipping(renorm_clipping, self.renorm, caller)
        self.renorm_momentum = checks.momentum(renorm_momentum, caller, "renorm_momentum")
        self.virtual_batch_size = checks.virtual_batch_size(virtual_batch_size, caller)
        if self.virtual_batch_size is not None and self.synchronized:
            raise ValueError(
                f"{caller}: arguments `virtual_batch_size` and "
                "`synchronized=True` don't combine (ghost batches are "
                "per-replica by definition); received virtual_batch_size="
                f"{virtual_batch_size}, synchronized=True."
            )
        self.unbiased_moving_variance = bool(unbiased_moving_variance)
        self.guard_bad_batches = bool(guard_bad_batches)
        self.track_running_stats = bool(track_running_stats)
        self.track_num_batches = bool(track_num_batches)
        self.adjustment = checks.adjustment(adjustment, caller)
        if self.virtual_batch_size is not None and self.adjustment is not None:
            # tf_keras refuses the pair as well (when the layer is built).
            raise ValueError(
                f"{caller}: arguments `virtual_batch_size` and `adjustment` "
                "don't combine (the adjustment acts on the whole batch); "
                f"received virtual_batch_size={virtual_batch_size}, "
                f"adjustment={adjustment!r}. Pass adjustment=None for ghost "
                "batches.")
        # Said now, not at the first training step.
        checks.fused_conflicts(
            self.fused, caller, renorm=self.renorm,
            virtual_batch_size=self.virtual_batch_size,
            synchronized=self.synchronized, adjustment=self.adjustment)
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    @property
    def _caller(self):
        return f"BatchNorm '{self.name}'"

    @property
    def _weight_dtype(self):
        # Half-precision moving variances overflow and lose small updates.
        return ops.statistics_dtype(self.variable_dtype)

    def _statistic(self, name, initializer, shape, dtype=None):
        # Moving statistics are computed identically on every replica (see
        # ops.normalize_batch); MEAN aggregation keeps the copies equal.
        integer = dtype is not None and dtype.startswith("int")
        return self.add_weight(
            shape=shape,
            name=name,
            initializer=initializer,
            dtype=dtype or self._weight_dtype,
            trainable=False,
            autocast=False,
            aggregation="only_first_replica" if integer else "mean",
        )

    def build(self, input_shape):
        channels = checks.known_channels(input_shape, self.axis, self._caller)
        # Several axes fix the rank: their negative entries are resolved
        # against it, and the weights have the sizes on them.
        self._built_rank = None if isinstance(self.axis, int) else len(input_shape)
        shape = (channels,) if isinstance(channels, int) else channels
        # Created in Keras's order so that get_weights()/set_weights()
        # interoperate with keras.layers.BatchNormalization; the weights
        # only some options need come after those four.
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                dtype=self._weight_dtype,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                dtype=self._weight_dtype,
                trainable=True,
                autocast=False,
            )
        self._channels = channels
        if self.track_running_stats:
            self.moving_mean = self._statistic(
                "moving_mean", self.moving_mean_initializer, shape)
            self.moving_variance = self._statistic(
                "moving_variance", self.moving_variance_initializer, shape)
        if self.renorm:
            # Keras's renorm weights, in Keras's order (Ioffe, 2017): the
            # moving stddev is what inference follows, the moving variance
            # is derived from it; renorm_mean/renorm_stddev give r and d.
            self.moving_stddev = self._statistic(
                "moving_stddev", _sqrt_of(self.moving_variance_initializer),
                shape)
            self.renorm_mean = self._statistic(
                "renorm_mean", self.moving_mean_initializer, shape)
            self.renorm_stddev = self._statistic(
                "renorm_stddev", _sqrt_of(self.moving_variance_initializer),
                shape)
        if self._counts_batches:
            self.num_batches_tracked = self._statistic(
                "num_batches_tracked", "zeros", (), backend.counter_dtype())
        if any(callable(v) for v in self.renorm_clipping.values()):
            # Only a bound that changes with the step needs the step.
            self.renorm_steps = self._statistic(
                "renorm_steps", "zeros", (), backend.counter_dtype())
        # Monitoring only, so not a Keras weight: it would break the
        # 4-weight get_weights()/set_weights() interchange with Keras. A
        # Keras variable (not a raw tf.Variable, which makes a tf.function
        # that builds the layer retrace and fail), kept out of Keras's and
        # TF's tracking by setting it past their __setattr__.
        # A callable initializer, so that Keras defers it in a symbolic pass.
        counter = keras.Variable(
            keras.initializers.Zeros(), shape=(), dtype=backend.counter_dtype(),
            trainable=False, name="refused_batches",
            aggregation="only_first_replica")
        object.__setattr__(self, "_refused_batches", counter)
        if backend.NAME == "jax":
            # JAX's trainer and stateless_call thread only the layer's
            # variables through a step; the counter must be one of them
            # (still not a weight) or its updates would be dropped.
            private_api.track_state(self, counter)

    @property
    def _counts_batches(self):
        return self.track_running_stats and (
            self.momentum is None or self.track_num_batches)

    def reset_running_stats(self):
        """Sets every moving statistic back to its initial value, as
        PyTorch's `reset_running_stats()` does: the moving mean and
        variance (and renorm's statistics) from their initializers,
        `num_batches_tracked` to 0. Trainable weights are not touched."""
        for name in _STATISTICS:
            variable = getattr(self, name, None)
            if variable is None:
                continue
            if name in ("num_batches_tracked", "renorm_steps"):
                value = K.zeros((), variable.dtype)
            elif name in ("moving_mean", "renorm_mean"):
                value = self.moving_mean_initializer(variable.shape, variable.dtype)
            elif name == "moving_variance":
                value = self.moving_variance_initializer(variable.shape, variable.dtype)
            else:  # moving_stddev, renorm_stddev
                value = _sqrt_of(self.moving_variance_initializer)(
                    variable.shape, variable.dtype)
            variable.assign(value)

    def set_weights(self, weights):
        """As Keras's, but every shape is checked before anything changes:
        a wrong array leaves all weights as they were."""
        weights = list(weights)
        if len(weights) == len(self.weights):
            for variable, value in zip(self.weights, weights):
                shape = tuple(getattr(value, "shape", ()))
                if shape != tuple(variable.shape):
                    raise ValueError(
                        f"{self._caller}: weight {variable.name!r} has shape "
                        f"{tuple(variable.shape)}; received an array of shape "
                        f"{shape}. Nothing was set."
                    )
        super().set_weights(weights)

    @property
    def refused_batches(self):
        """Training batches whose statistics the bad-batch guard refused."""
        return int(K.convert_to_numpy(self._refused_batches))

    @property
    def skipped_updates(self):
        """The name 0.1.0 gave `refused_batches`."""
        return self.refused_batches

    def call(self, inputs, training=None, mask=None):
        caller = self._caller
        inputs, axis = checks.layer_input(
            inputs, self._channels, self.axis, self.compute_dtype, caller, self._built_rank)
        training = checks.training(training, caller)
        if not self.trainable:
            training = False
        if mask is not None:
            mask = checks.mask(mask, inputs, caller)
            if training is False:
                mask = None  # inference ignores it, as in Keras's layer
            else:
                checks.fused_conflicts(self.fused, caller, mask=mask)
        if isinstance(training, bool):
            return self._train(inputs, axis, mask) if training else self._infer(inputs, axis)
        # A symbolic flag: the update happens only inside the training branch.
        return backend.cond(training, lambda: self._train(inputs, axis, mask),
                            lambda: self._infer(inputs, axis))

    def _gamma_and_beta(self, dtype):
        """The affine weights read in the statistics dtype (None if absent)."""
        return tuple(None if v is None else _vector(v, dtype) for v in (self.gamma, self.beta))

    def _train(self, inputs, axis, mask):
        if self.virtual_batch_size is not None:
            if mask is not None:
                raise ValueError(
                    f"{self._caller}: a `mask` and virtual_batch_size="
                    f"{self.virtual_batch_size} don't combine; received a mask "
                    "with ghost batch normalization on.")
            checks.batch_axis_free(axis, self.virtual_batch_size, self.axis, self._caller)
            inputs = checks.batch_multiple(inputs, self.virtual_batch_size, self._caller)
        dtype = ops.statistics_dtype(inputs.dtype)
        gamma, beta = self._gamma_and_beta(dtype)
        adjustment = None
        if self.adjustment is not None:
            # Called here, so only in training (the training branch of a
            # symbolic flag), with the dynamic shape as tf_keras passes it.
            adjustment = checks.adjustment_output(
                self.adjustment(backend.dynamic_shape(inputs)), self._channels, dtype,
                self._caller)
        y, stats = dispatch.train(
            inputs, gamma=gamma, beta=beta, epsilon=self.epsilon, axis=axis,
            fused=self.fused, synchronized=self.synchronized,
            virtual_batch_size=self.virtual_batch_size, mask=mask,
            correction=self._renorm_correction(dtype) if self.renorm else None,
            adjustment=adjustment, caller=self._caller)
        if self.track_running_stats:
            # Updates after the output: nothing they overwrite is read late.
            return backend.after(y, lambda: self._update_statistics(stats))
        return y

    def _infer(self, inputs, axis):
        dtype = ops.statistics_dtype(inputs.dtype)
        gamma, beta = self._gamma_and_beta(dtype)
        if not self.track_running_stats:
            # PyTorch's track_running_stats=False: batch statistics always.
            return dispatch.train(
                inputs, gamma=gamma, beta=beta, epsilon=self.epsilon, axis=axis,
                fused=self.fused, synchronized=self.synchronized,
                caller=self._caller)[0]
        return dispatch.infer(
            inputs, mean=_vector(self.moving_mean, dtype),
            variance=_vector(self.moving_variance, dtype), gamma=gamma, beta=beta,
            epsilon=self.epsilon, axis=axis, fused=self.fused, caller=self._caller)

    def _update_statistics(self, stats):
        momentum = self.momentum
        if momentum is None:
            momentum = ops.cumulative_momentum(self.num_batches_tracked, stats.mean.dtype)
        if self._built_rank is not None:
            # The (C,) statistics in the weights' shape, (d1, d2, ...).
            stats = ops.BatchStats(*(K.reshape(t, self.moving_mean.shape) for t in stats))
        mean, variance, accepted = ops.moving_target(
            stats, unbiased=self.unbiased_moving_variance,
            guard=self.guard_bad_batches)

        def assign(variable, new, old=None):
            # A refused batch leaves the variable's exact bits.
            old = K.cast(variable, new.dtype) if old is None else old
            variable.assign(K.cast(ops.kept_unless(accepted, old, new), variable.dtype))

        def update(variable, value, momentum=momentum):
            old = K.cast(variable, value.dtype)
            new = ops.update_moving(old, value, momentum)
            assign(variable, new, old)
            return new

        update(self.moving_mean, mean)
        if self.renorm:
            # Inference follows a moving stddev, as the paper and Keras do;
            # the moving variance is derived from it (never negative).
            stddev = update(self.moving_stddev,
                            ops.stddev_of(variance=variance, epsilon=self.epsilon))
            assign(self.moving_variance, ops.variance_of(stddev=stddev, epsilon=self.epsilon))
            update(self.renorm_mean, stats.mean, self.renorm_momentum)
            update(self.renorm_stddev,
                   ops.stddev_of(variance=stats.variance, epsilon=self.epsilon),
                   self.renorm_momentum)
        else:
            update(self.moving_variance, variance)
        if self._counts_batches:
            self.num_batches_tracked.assign_add(K.cast(accepted, self.num_batches_tracked.dtype))
        if hasattr(self, "renorm_steps"):
            self.renorm_steps.assign_add(1)
        self._refused_batches.assign_add(K.cast(K.logical_not(accepted), self._refused_batches.dtype))

    def _renorm_correction(self, dtype):
        """Batch renormalization's `f(mean, variance, broadcast) -> (r, d)`.

        The renorm statistics are read here, before the forward pass, not
        inside it: read within the custom gradient, Grappler's dependency
        optimizer was seen to let their update overtake the read.
        """
        renorm_mean = _vector(self.renorm_mean, dtype)
        renorm_stddev = _vector(self.renorm_stddev, dtype)
        step = K.cast(getattr(self, "renorm_steps", 0), "float32")
        # A numeric bound goes straight to the statistics dtype; a float32
        # round trip would move 1.2 by 5e-8 in float64.
        bounds = {k: K.cast(v(step), dtype) if callable(v) else K.convert_to_tensor(v, dtype)
                  for k, v in self.renorm_clipping.items()}

        def correction(mean, variance, broadcast):
            return ops.renorm_correction(
                mean=mean, variance=variance, renorm_mean=broadcast(renorm_mean),
                renorm_stddev=broadcast(renorm_stddev), epsilon=self.epsilon, bounds=bounds)

        return correction

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": keras.initializers.serialize(
                    self.beta_initializer
                ),
                "gamma_initializer": keras.initializers.serialize(
                    self.gamma_initializer
                ),
                "moving_mean_initializer": keras.initializers.serialize(
                    self.moving_mean_initializer
                ),
                "moving_variance_initializer": keras.initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": keras.regularizers.serialize(
                    self.beta_regularizer
                ),
                "gamma_regularizer": keras.regularizers.serialize(
                    self.gamma_regularizer
                ),
                "beta_constraint": keras.constraints.serialize(
                    self.beta_constraint
                ),
                "gamma_constraint": keras.constraints.serialize(
                    self.gamma_constraint
                ),
                "fused": self.fused,
                "synchronized": self.synchronized,
                "renorm": self.renorm,
                "renorm_clipping": {
                    k: _serialize_bound(v) for k, v in self.renorm_clipping.items()
                } or None,
                "renorm_momentum": self.renorm_momentum,
                "virtual_batch_size": self.virtual_batch_size,
                "unbiased_moving_variance": self.unbiased_moving_variance,
                "guard_bad_batches": self.guard_bad_batches,
                "track_running_stats": self.track_running_stats,
                "track_num_batches": self.track_num_batches,
                "adjustment": keras.saving.serialize_keras_object(self.adjustment),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        clipping = config.get("renorm_clipping")
        if clipping:
            config["renorm_clipping"] = {
                k: _deserialize_bound(v) for k, v in clipping.items()}
        if isinstance(config.get("adjustment"), dict):
            # Keras's rules: a registered function by name, a lambda only
            # with safe_mode=False.
            config["adjustment"] = keras.saving.deserialize_keras_object(
                config["adjustment"])
        return super().from_config(config)


# The layers the model-wide functions (recalibrate, fold_batch_norms,
# to_torch_state_dict) treat as batch norms: ours and Keras's, subclasses
# included. Conversion between the two matches exact classes instead.
BATCH_NORM_TYPES = (BatchNorm, keras.layers.BatchNormalization)


def _vector(weight, dtype):
    """A weight in `dtype` as the (C,) vector the kernels take: a multi-axis
    layer's (d1, d2, ...) weights run row-major over its axes."""
    v = K.cast(weight, dtype)
    return v if len(v.shape) == 1 else K.reshape(v, [-1])


def _sqrt_of(initializer):
    """An initializer for a standard deviation from one for a variance.

    The square root alone, not `ops.stddev_of`: Keras's layer (and
    tf_keras's) starts its moving stddev so, and weights carry over between
    them; the first update brings epsilon in.
    """
    def initialize(shape, dtype=None):
        return K.sqrt(initializer(shape, dtype=dtype))
    return initialize


def _serialize_bound(bound):
    if isinstance(bound, keras.optimizers.schedules.LearningRateSchedule):
        return keras.optimizers.schedules.serialize(bound)
    if callable(bound):
        return keras.saving.serialize_keras_object(bound)
    return bound


def _deserialize_bound(bound):
    if isinstance(bound, dict) and "class_name" in bound:
        if bound.get("module", "").startswith("keras.optimizers.schedules"):
            return keras.optimizers.schedules.deserialize(bound)
        return keras.saving.deserialize_keras_object(bound)
    return bound
