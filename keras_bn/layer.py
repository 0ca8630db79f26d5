"""The `BatchNorm` Keras layer: weights, moving-average updates and config.

The math is `keras_bn.ops.batch_norm`; this module decides between batch and
moving statistics and writes the moving statistics back.
"""

import keras
import tensorflow as tf

from keras_bn import ops


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
            True requires the kernel and raises if it can't serve; False
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
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of rank >= 2 with the built number of channels on
            `axis`.
        training: Python bool, or a scalar bool tensor inside `tf.function`
            (both branches are traced once). None (the default outside
            `fit()`) means inference.

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
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
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = f"BatchNorm '{self.name}'"
        self.axis = ops.check_axis(axis, owner)
        self.momentum = ops.check_momentum(momentum, owner)
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
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(
                f"{owner}: argument `fused` must be None, True or False; "
                f"received fused={fused!r}."
            )
        self.fused = fused
        self.synchronized = bool(synchronized)
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

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        axis = ops.channel_axis(len(input_shape), self.axis, self._owner)
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"{self._owner}: the channel dimension (axis {self.axis}) of "
                f"the input must be known at build time; received input "
                f"shape {input_shape}."
            )
        shape = (int(channels),)
        # Created in Keras's order so that get_weights()/set_weights()
        # interoperate with keras.layers.BatchNormalization.
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
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            dtype=self._weight_dtype,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            dtype=self._weight_dtype,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )

    def _check_inputs(self, inputs):
        rank = inputs.shape.rank
        axis = ops.channel_axis(rank, self.axis, self._owner)
        expected = self.moving_mean.shape[0]
        received = inputs.shape[axis]
        if received is not None and received != expected:
            raise ValueError(
                f"{self._owner} was built for {expected} channels on axis "
                f"{self.axis}; received an input with {received} channels "
                f"(shape {tuple(inputs.shape)})."
            )
        if not inputs.dtype.is_floating:
            if inputs.dtype not in (tf.bool,) and not inputs.dtype.is_integer:
                raise TypeError(
                    f"{self._owner}: expected a numeric input tensor; "
                    f"received dtype {inputs.dtype.name}."
                )
            inputs = tf.cast(inputs, self.compute_dtype)
        return inputs

    def _batch_norm(self, inputs, training):
        return ops.batch_norm(
            inputs,
            self.gamma,
            self.beta,
            self.moving_mean,
            self.moving_variance,
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            fused=self.fused,
            synchronized=self.synchronized,
        )

    def _train(self, inputs):
        y, mean, variance = self._batch_norm(inputs, True)
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        return y

    def _infer(self, inputs):
        return self._batch_norm(inputs, False)[0]

    def call(self, inputs, training=None):
        inputs = self._check_inputs(tf.convert_to_tensor(inputs))
        training = ops.check_training(training, self._owner)
        if not self.trainable:
            training = False
        if isinstance(training, bool):
            return self._train(inputs) if training else self._infer(inputs)
        # A symbolic flag: the update happens only inside the training branch.
        return tf.cond(
            training, lambda: self._train(inputs), lambda: self._infer(inputs)
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
            }
        )
        return config
