"""The `BatchNorm` Keras layer: weights, moving-average updates and config.

The math lives in `keras_bn.ops`; this module decides between batch and
moving statistics, and writes the moving statistics back.
"""

import numbers

import keras
import tensorflow as tf

from keras_bn import ops

_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
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
            rank >= 2; only the channel size is fixed at build time.
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
            `virtual_batch_size` or `synchronized=True` (a ValueError here)
            or a training-mode `mask` (a ValueError at the call), and it
            raises at the call for a float64 input. False always uses TF
            ops. The function computed is the same.
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
            gives. `skipped_updates` counts such batches (a monitoring
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
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of rank >= 2 with the built number of channels on
            `axis`.
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
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = self._owner
        self.axis = ops.check_axis(axis, owner)
        self.momentum = (
            None if momentum is None else ops.check_momentum(momentum, owner))
        self.epsilon = ops.check_epsilon(epsilon, owner)
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
        self.fused = ops.check_fused(fused, owner)
        self.synchronized = bool(synchronized)
        self.renorm = bool(renorm)
        self.renorm_clipping = _check_clipping(renorm_clipping, owner)
        if self.renorm_clipping and not self.renorm:
            raise ValueError(
                f"{owner}: argument `renorm_clipping` needs renorm=True; "
                f"received renorm_clipping={renorm_clipping!r} with "
                "renorm=False."
            )
        self.renorm_momentum = ops.check_momentum(
            renorm_momentum, f"{owner} (renorm_momentum)")
        self.virtual_batch_size = _check_virtual_batch_size(
            virtual_batch_size, owner)
        if self.virtual_batch_size is not None and self.synchronized:
            raise ValueError(
                f"{owner}: arguments `virtual_batch_size` and "
                "`synchronized=True` don't combine (ghost batches are "
                "per-replica by definition); received virtual_batch_size="
                f"{virtual_batch_size}, synchronized=True."
            )
        self.unbiased_moving_variance = bool(unbiased_moving_variance)
        self.guard_bad_batches = bool(guard_bad_batches)
        self.track_running_stats = bool(track_running_stats)
        self.track_num_batches = bool(track_num_batches)
        if self.fused:
            # The kernel computes plain per-replica statistics only: say so
            # now, not at the first training step.
            for name, value in (("renorm", self.renorm),
                                ("virtual_batch_size", self.virtual_batch_size),
                                ("synchronized", self.synchronized)):
                if value not in (None, False):
                    raise ValueError(
                        f"{owner}: argument `{name}` needs the TF-ops path, "
                        f"but fused=True requires TensorFlow's fused kernel; "
                        f"received {name}={value!r} with fused=True. Pass "
                        "fused=None (the default) or False."
                    )
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    @property
    def _owner(self):
        return f"BatchNorm '{self.name}'"

    @property
    def _weight_dtype(self):
        # Half-precision moving variances overflow and lose small updates.
        return ops.statistics_dtype(self.variable_dtype).name

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
        shape = (ops.known_channels(input_shape, self.axis, self._owner),)
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
        self._channels = shape[0]
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
                "num_batches_tracked", "zeros", (), "int64")
        if any(callable(v) for v in self.renorm_clipping.values()):
            # Only a bound that changes with the step needs the step.
            self.renorm_steps = self._statistic(
                "renorm_steps", "zeros", (), "int64")
        # Monitoring only, so not a Keras weight: it would break the
        # 4-weight get_weights()/set_weights() interchange with Keras. A
        # Keras variable (not a raw tf.Variable, which makes a tf.function
        # that builds the layer retrace and fail), kept out of Keras's and
        # TF's tracking by setting it past their __setattr__.
        # A callable initializer, so that Keras defers it in a symbolic pass.
        object.__setattr__(self, "_skipped_updates", keras.Variable(
            keras.initializers.Zeros(), shape=(), dtype="int64",
            trainable=False, name="skipped_updates",
            aggregation="only_first_replica"))

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
                value = tf.zeros((), variable.dtype)
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
                        f"{self._owner}: weight {variable.name!r} has shape "
                        f"{tuple(variable.shape)}; received an array of shape "
                        f"{shape}. Nothing was set."
                    )
        super().set_weights(weights)

    @property
    def skipped_updates(self):
        """Training batches whose statistics the bad-batch guard refused."""
        return int(self._skipped_updates.numpy())

    def _check_inputs(self, inputs):
        if isinstance(inputs, tf.RaggedTensor):
            raise TypeError(
                f"{self._owner}: expected a dense tensor; received a "
                "RaggedTensor. Pad it with `x.to_tensor()` and pass `mask=` to "
                "keep the padding out of the batch statistics."
            )
        if isinstance(inputs, tf.SparseTensor):
            raise TypeError(
                f"{self._owner}: expected a dense tensor; received a "
                "SparseTensor. Convert it with `tf.sparse.to_dense(x)` first."
            )
        inputs = tf.convert_to_tensor(inputs)
        rank = inputs.shape.rank
        axis = ops.channel_axis(rank, self.axis, self._owner)
        expected = self._channels
        received = inputs.shape[axis]
        message = (
            f"{self._owner} was built for {expected} channels on axis "
            f"{self.axis}; received an input with"
        )
        if received is not None and received != expected:
            raise ValueError(
                f"{message} {received} channels (shape {tuple(inputs.shape)})."
            )
        if received is None:
            # Known only at run time (a traced [None, None] signature).
            with tf.control_dependencies([tf.debugging.assert_equal(
                    tf.shape(inputs)[axis], expected,
                    message=f"{message} another number of channels.")]):
                inputs = tf.identity(inputs)
        if not inputs.dtype.is_floating:
            if inputs.dtype not in (tf.bool,) and not inputs.dtype.is_integer:
                raise TypeError(
                    f"{self._owner}: expected a real-valued (float, integer "
                    f"or bool) input tensor; received dtype "
                    f"{inputs.dtype.name}."
                )
            inputs = tf.cast(inputs, self.compute_dtype)
        return inputs, axis

    def _check_mask(self, mask, inputs, training):
        """The mask as a bool tensor of the input's rank, or None.

        Keras's conventions: a mask of the input's rank minus one lacks the
        last axis (as `Masking` and `Embedding(mask_zero=True)` give it) and
        gets it back with size 1; either way it must broadcast to the input.
        """
        if mask is None:
            return None
        mask = tf.convert_to_tensor(mask)
        received = tuple(mask.shape)
        rank = inputs.shape.rank
        if mask.shape.rank == rank - 1:
            mask = tf.expand_dims(mask, -1)
        if mask.shape.rank != rank or not all(
                m in (1, None) or d is None or m == d
                for m, d in zip(mask.shape, inputs.shape)):
            raise ValueError(
                f"{self._owner}: argument `mask` must broadcast to the input's "
                f"shape {tuple(inputs.shape)}, or do so once given a last axis "
                f"of size 1 (Keras's masks lack the last axis); received shape "
                f"{received}."
            )
        if training is False:
            return None  # inference ignores the mask, as in Keras's layer
        if self.fused:
            raise ValueError(
                f"{self._owner}: a `mask` needs the TF-ops path, but "
                "fused=True requires TensorFlow's fused kernel; received a "
                "mask with fused=True."
            )
        if self.virtual_batch_size is not None:
            raise ValueError(
                f"{self._owner}: a `mask` and virtual_batch_size="
                f"{self.virtual_batch_size} don't combine; received a mask "
                "with ghost batch normalization on."
            )
        return tf.cast(mask, tf.bool)

    def _check_batch(self, inputs):
        v = self.virtual_batch_size
        if v is None:
            return inputs
        batch = inputs.shape[0]
        message = (
            f"{self._owner}: the batch size must be a multiple of "
            f"virtual_batch_size={v}; received"
        )
        if batch is not None:
            if batch % v:
                raise ValueError(f"{message} a batch of {batch}.")
            return inputs
        with tf.control_dependencies([tf.debugging.assert_equal(
                tf.shape(inputs)[0] % v, 0, message=f"{message} another size.")]):
            return tf.identity(inputs)

    def _vectors(self, stat_dtype):
        def read(variable):
            return None if variable is None else tf.cast(variable, stat_dtype)
        return read(self.gamma), read(self.beta)

    def _train(self, inputs, axis, mask):
        inputs = self._check_batch(inputs)
        stat_dtype = ops.statistics_dtype(inputs.dtype)
        gamma, beta = self._vectors(stat_dtype)
        y, stats = ops.normalize_batch(
            inputs, gamma, beta, epsilon=self.epsilon, axis=axis,
            fused=self.fused, synchronized=self.synchronized,
            virtual_batch_size=self.virtual_batch_size, mask=mask,
            correction=self._renorm_correction(stat_dtype) if self.renorm else None,
        )
        if self.track_running_stats:
            # Updates after the output: nothing they overwrite is read late.
            with tf.control_dependencies([y]):
                self._update_statistics(stats)
        return y

    def _update_statistics(self, stats):
        momentum = self.momentum
        if momentum is None:
            momentum = ops.cumulative_momentum(self.num_batches_tracked, stats.mean.dtype)
        mean, variance, accepted = ops.moving_target(
            stats, unbiased=self.unbiased_moving_variance,
            guard=self.guard_bad_batches)

        def update(variable, value, momentum=momentum):
            old = tf.cast(variable, value.dtype)
            new = ops.update_moving(old, value, momentum)
            variable.assign(tf.cast(ops.kept_unless(accepted, old, new), variable.dtype))
            return new

        update(self.moving_mean, mean)
        if self.renorm:
            # Inference follows a moving stddev, as the paper and Keras do;
            # the moving variance is derived from it (never negative).
            stddev = update(self.moving_stddev, tf.sqrt(variance + self.epsilon))
            derived = tf.nn.relu(tf.square(stddev) - self.epsilon)
            self.moving_variance.assign(tf.cast(ops.kept_unless(
                accepted, tf.cast(self.moving_variance, derived.dtype), derived),
                self.moving_variance.dtype))
            update(self.renorm_mean, stats.mean, self.renorm_momentum)
            update(self.renorm_stddev, tf.sqrt(stats.variance + self.epsilon),
                   self.renorm_momentum)
        else:
            update(self.moving_variance, variance)
        if self._counts_batches:
            self.num_batches_tracked.assign_add(tf.cast(accepted, tf.int64))
        if hasattr(self, "renorm_steps"):
            self.renorm_steps.assign_add(1)
        self._skipped_updates.assign_add(tf.cast(tf.logical_not(accepted), tf.int64))

    def _renorm_correction(self, dtype):
        """Batch renormalization's `f(mean, variance, broadcast) -> (r, d)`.

        The renorm statistics are read here, before the forward pass, not
        inside it: read within the custom gradient, Grappler's dependency
        optimizer was seen to let their update overtake the read.
        """
        # Early in training the renorm stddev may be tiny; sqrt(epsilon) is
        # the smallest a batch stddev can be.
        renorm_stddev = tf.maximum(
            tf.cast(self.renorm_stddev, dtype), tf.sqrt(tf.constant(self.epsilon, dtype)))
        renorm_mean = tf.cast(self.renorm_mean, dtype)
        step = tf.cast(getattr(self, "renorm_steps", 0), tf.float32)
        # A numeric bound goes straight to the statistics dtype; a float32
        # round trip would move 1.2 by 5e-8 in float64.
        bounds = {k: tf.cast(v(step), dtype) if callable(v) else tf.constant(v, dtype)
                  for k, v in self.renorm_clipping.items()}

        def correction(mean, variance, broadcast):
            stddev = tf.sqrt(variance + self.epsilon)
            r = stddev / broadcast(renorm_stddev)
            d = (mean - broadcast(renorm_mean)) / broadcast(renorm_stddev)
            if "rmin" in bounds:
                r = tf.maximum(r, bounds["rmin"])
            if "rmax" in bounds:
                r = tf.minimum(r, bounds["rmax"])
            if "dmax" in bounds:
                d = tf.clip_by_value(d, -bounds["dmax"], bounds["dmax"])
            return r, d

        return correction

    def _infer(self, inputs, axis):
        if not self.track_running_stats:
            # PyTorch's track_running_stats=False: batch statistics always.
            stat_dtype = ops.statistics_dtype(inputs.dtype)
            gamma, beta = self._vectors(stat_dtype)
            return ops.normalize_batch(
                inputs, gamma, beta, epsilon=self.epsilon, axis=axis,
                fused=self.fused, synchronized=self.synchronized)[0]
        stat_dtype = ops.statistics_dtype(inputs.dtype)
        gamma, beta = self._vectors(stat_dtype)
        return ops.normalize_inference(
            inputs, tf.cast(self.moving_mean, stat_dtype),
            tf.cast(self.moving_variance, stat_dtype), gamma, beta,
            epsilon=self.epsilon, axis=axis, fused=self.fused)

    def call(self, inputs, training=None, mask=None):
        inputs, axis = self._check_inputs(inputs)
        training = ops.check_training(training, self._owner)
        if not self.trainable:
            training = False
        mask = self._check_mask(mask, inputs, training)
        if isinstance(training, bool):
            if training:
                return self._train(inputs, axis, mask)
            return self._infer(inputs, axis)
        # A symbolic flag: the update happens only inside the training branch.
        return tf.cond(
            training,
            lambda: self._train(inputs, axis, mask),
            lambda: self._infer(inputs, axis),
        )

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
        return super().from_config(config)


def _sqrt_of(initializer):
    """An initializer for a standard deviation from one for a variance."""
    def initialize(shape, dtype=None):
        return tf.sqrt(initializer(shape, dtype=dtype))
    return initialize


def _check_virtual_batch_size(value, owner):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"{owner}: argument `virtual_batch_size` must be None or an "
            f"integer >= 1; received virtual_batch_size={value!r}."
        )
    return int(value)


def _check_clipping(clipping, owner):
    if clipping is None:
        return {}
    if not isinstance(clipping, dict) or set(clipping) - set(_CLIPPING_KEYS):
        raise ValueError(
            f"{owner}: argument `renorm_clipping` must be a dict with keys "
            f"among {_CLIPPING_KEYS}; received renorm_clipping={clipping!r}."
        )
    for key, value in clipping.items():
        if callable(value):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
            raise ValueError(
                f"{owner}: renorm_clipping[{key!r}] must be a number >= 0, a "
                "Keras LearningRateSchedule or a callable of the step; "
                f"received {value!r}."
            )
    rmin, rmax = clipping.get("rmin"), clipping.get("rmax")
    if isinstance(rmin, numbers.Real) and isinstance(rmax, numbers.Real) and rmax < rmin:
        raise ValueError(
            f"{owner}: renorm_clipping needs rmin <= rmax; received "
            f"rmin={rmin}, rmax={rmax}."
        )
    return dict(clipping)


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
