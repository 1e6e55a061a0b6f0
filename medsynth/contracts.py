"""The written contracts between medsynth's parts: what the CLI and the modules rely on, as ``typing.Protocol``.

A plug-in satisfies a contract by having the methods and attributes below; it does not inherit from them.
The CLI tests for an optional contract with ``isinstance`` (the protocols are runtime-checkable), never by probing
attribute names. See docs/architecture.md and docs/extending.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Optional, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

NetFactory = Callable[[int, int], nn.Module]
"""Builds a denoising net: ``net(in_channels, out_channels)``, plus ``num_class_embeds=`` for class-conditional
models. In YAML a class path with its other arguments; the model supplies the channel counts. (A plain callable
type rather than a Protocol, so that jsonargparse builds it from ``class_path``/``init_args``.)"""


class DenoisingNet(Protocol):
    """A denoising net: the noised input with conditioning channels ``x`` ``(B, in_channels, *spatial)`` and
    timesteps ``t`` ``(B,)`` (and class labels ``(B,)`` when built with ``num_class_embeds``) to the objective's
    target ``(B, out_channels, *spatial)``."""

    def __call__(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor: ...


@runtime_checkable
class ChecksSpatialShape(Protocol):
    """A net that takes only some spatial shapes (e.g. multiples of its sub-volume size) and says which."""

    def check_spatial_shape(self, spatial: Sequence[int]) -> None:
        """Raise :class:`~medsynth.errors.MedsynthError` for a shape the net cannot take."""


@runtime_checkable
class AutoencoderNet(Protocol):
    """An autoencoder net a latent model decodes with (:mod:`medsynth.nets.autoencoders`)."""

    spatial_dims: int
    latent_channels: int
    downsample_factor: int
    """Latent voxels per image voxel, per axis."""

    def encode(self, x: Tensor) -> Tensor:
        """``(B, C, *spatial)`` in [-1, 1] to latents ``(B, latent_channels, *spatial / downsample_factor)``."""

    def decode(self, z: Tensor) -> Tensor:
        """Latents back to ``(B, C, *spatial)``."""


@runtime_checkable
class DescribesData(Protocol):
    """A datamodule that tells the model what it must know about the data; the CLI links each entry into the
    model argument of the same name (``num_classes``, ``image_channels``, ``image_size``, ``class_names``,
    ``output``, ``sample_shape``, ``latent_space``).

    Its class also says which of its constructor arguments a checkpoint supplies when a trained model is used
    again (:class:`DeclaresDataArgs`; :class:`~medsynth.data.base.MedsynthDataModule` declares none by default).
    """

    def model_args(self) -> dict: ...


class DeclaresDataArgs(Protocol):
    """A datamodule class whose some constructor arguments ``predict``, ``validate``, ``test`` and ``export`` with
    ``--ckpt_path`` take from the checkpoint's saved datamodule arguments (the CLI reads these class attributes)."""

    model_describing_args: ClassVar[tuple[str, ...]]
    """Arguments that describe the data the model was shaped by (class count, channels, size, intensity scaling):
    the checkpoint's values win over the command line's (each replaced value is reported), also when the
    checkpoint was trained on another datamodule class with an argument of that name."""

    data_location_args: ClassVar[tuple[str, ...]]
    """Arguments that say where the data lives: the checkpoint's values (same datamodule class only) fill those
    the command line leaves unset."""


class FromModel:
    """An entry of :meth:`DescribesData.model_args` that the data cannot give alone: the model's own value (from
    its checkpoint, config or command line) stands, or what ``adopt`` makes of the model's own values of all the
    linked arguments (a dict by name: ``num_classes``, ..., ``latent_space``): it may check them, complete them
    with what the data knows (an output size in the model's latent voxels), or remember them for the data's own
    use (the class names to generate for).

    Data that describes itself fully never returns one: its values replace the model's, as always. A latent
    datamodule without a latent manifest does, to generate from a model that already knows its latent space.
    """

    def __init__(self, adopt: Optional[Callable[[dict], object]] = None) -> None:
        self.adopt = adopt


@runtime_checkable
class ChecksFitInputs(Protocol):
    """A module with inputs of its own to check before training writes anything (shapes the net cannot take,
    a stage-1 checkpoint); the CLI calls it after the datamodule is set up."""

    def check_fit_inputs(self, datamodule) -> None: ...


@runtime_checkable
class ChecksPredictInputs(Protocol):
    """A module with inputs of its own to check before ``predict`` writes anything (an autoencoder that does not
    fit, a sample shape the net cannot produce)."""

    def check_predict_inputs(self) -> None: ...


@runtime_checkable
class WritesPredictions(Protocol):
    """A module whose predictions are written by a writer of its own choosing (the default is the sample
    writer): ``medsynth predict`` adds the callback it returns. The writer gets everything it records through its
    constructor; it reads nothing set on the Trainer."""

    def prediction_writer(self, output_dir: Path, metadata: dict, config: Optional[dict]):
        """The ``BasePredictionWriter`` that writes this module's predictions under ``output_dir``, with
        ``metadata`` (the checkpoint) and ``config`` (the run's resolved config, ``None`` outside the CLI)
        recorded beside them."""


class DeclaresPredictArgs(Protocol):
    """A module class whose some arguments are chosen anew at every ``predict`` (a sampler, a seed), not taken
    from the checkpoint as the architecture is: ``predict --ckpt_path`` keeps these from the command line."""

    predict_time_args: ClassVar[tuple[str, ...]]
