"""The training loop: loss, epochs with validation, exact checkpoints and resume, the model, its card and export."""

from __future__ import annotations

import datetime
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_file
from ..errors import Cancelled, InputError
from ..io.images import read_mask, read_volume
from ..network.architectures import ARCHITECTURES
from ..network.export import export_onnx
from ..network.models import ModelCard, file_sha256, load_model, network_dimensions, save_model
from ..threads import available_cores
from .arguments import command_line
from .config import TrainingConfig, TrainingResult
from .data import heldout_range, prepare_volume, samplers
from .plot import write_loss_curves
from .synthesis import prepare_label_map

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


def bone_loss(dice_weight: float = 0.0):
    """Binary cross-entropy plus ``dice_weight`` times the batch's soft Dice loss (Keras 3 ops only).

    Targets with a second channel (:meth:`PatchSampler.batch`) count only the
    voxels where it is 1: the mean cross-entropy and the Dice are over those.
    """
    from keras import ops

    def loss(y_true, y_pred):
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        bone = y_true[..., :1]
        counted = y_true[..., 1:] if y_true.shape[-1] == 2 else ops.ones_like(bone)
        p = ops.clip(y_pred, 1e-7, 1.0 - 1e-7)
        bce = -(bone * ops.log(p) + (1.0 - bone) * ops.log(1.0 - p))
        total = ops.sum(counted * bce) / ops.maximum(ops.sum(counted), 1.0)
        if not dice_weight:
            return total
        overlap = ops.sum(counted * bone * y_pred)
        dice = 1.0 - (2.0 * overlap + 1.0) / (ops.sum(counted * bone) + ops.sum(counted * y_pred) + 1.0)
        return total + dice_weight * dice

    return loss


@dataclass
class _State:
    """What a checkpoint holds besides weights and optimiser variables."""

    step: int = 0
    epoch_loss_sum: float = 0.0
    best_loss: float = float("inf")
    best_epoch: int | None = None
    seconds: float = 0.0
    history: list = field(default_factory=list)
    sampler: dict | None = None
    signature: dict | None = None


def train(config: TrainingConfig, progress: Progress | None = None) -> TrainingResult:
    """Train (or fine-tune, or resume) the U-Net as ``config`` says; see the module doc.

    ``progress(stage, fraction)`` is called after every step; an exception
    raised from it stops the run after saving a checkpoint (resume with
    ``config.resume``) and is raised as :class:`~KneeBoneSegLib.errors.Cancelled`.
    """
    import keras
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    config = config.validate()
    _check_output(config)
    started = datetime.datetime.now(datetime.timezone.utc)
    keras.utils.set_random_seed(config.seed)
    network, card = _initial_network(config)

    volumes, data = [], []
    # At a synthetic fraction of 1 no real image is read: the network never sees one.
    for image_path, labels_path in zip(config.images, config.labels) if config.synthetic_fraction < 1 else ():
        image = read_volume(image_path)
        # Half a sub-volume past the range: every crop still has at least half its voxels trained on.
        context_mm = (
            card.patch_size / 2 * (card.spacing_mm[0] if card.spacing_mm else image.geometry.spacing[0])
            if config.crops_past_range
            else 0.0
        )
        volume = prepare_volume(
            image,
            read_mask(labels_path),
            card.spacing_mm,
            card.normalization,
            config.train_range_i,
            name=str(labels_path),
            soft_labels=config.soft_labels,
            context_mm=context_mm,
        )
        volume.record.update(
            image=image_path.name,
            labels=labels_path.name,
            image_sha256=_sha256(image_path),
            labels_sha256=_sha256(labels_path),
        )
        volumes.append(volume)
        data.append(volume.record)
    label_maps = _label_maps(config, card)
    synthesis_record = [label_map.record for label_map in label_maps]
    # The scan's length along i, from its image or, when only its labels were used, from them.
    lengths = [record["shape_ijk"][0] for record in data] + [
        record["shape_ijk"][0] for record in synthesis_record if "train_range_i" in record
    ]
    card.heldout = heldout_range(config.train_range_i, lengths[0]) if lengths else None
    sampler, (validation_x, validation_y) = samplers(
        volumes, config, card.patch_size, network_dimensions(card), label_maps
    )

    network.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=bone_loss(config.dice_weight))
    network.optimizer.build(network.trainable_variables)
    state = _State(signature=_signature(config), sampler=sampler.state)
    best_weights = network.get_weights()
    if config.resume and config.checkpoint_path.is_file():
        state, best_weights = _load_checkpoint(config.checkpoint_path, network, state.signature)
        sampler.set_state(state.sampler)
        log.info(
            "Resuming %s at step %d (epoch %d)", config.output, state.step, state.step // config.steps_per_epoch + 1
        )

    total_steps = config.epochs * config.steps_per_epoch
    run_start = time.perf_counter() - state.seconds
    with (
        logging_redirect_tqdm(),
        tqdm(
            total=total_steps,
            initial=state.step,
            unit="step",
            disable=None if config.progress_bar else True,
            desc="training",
        ) as bar,
    ):
        while state.step < total_steps:
            images, bone = sampler.batch(config.batch_size)
            loss = float(network.train_on_batch(images, bone, return_dict=True)["loss"])
            network.reset_metrics()  # train_on_batch reports a running mean; keep per-step losses
            state.step += 1
            state.epoch_loss_sum += loss
            state.sampler = sampler.state
            state.seconds = time.perf_counter() - run_start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if state.step % config.steps_per_epoch == 0:
                best_weights = _end_epoch(
                    config,
                    card,
                    network,
                    state,
                    best_weights,
                    (validation_x, validation_y),
                    data,
                    started,
                    synthesis_record,
                )
                if config.max_minutes is not None and state.seconds >= 60 * config.max_minutes:
                    log.info(
                        "time budget of %g min spent at step %d of %d", config.max_minutes, state.step, total_steps
                    )
                    break
            try:
                if progress is not None:
                    progress("training", state.step / total_steps)
            except Exception as error:
                _save_checkpoint(config.checkpoint_path, network, best_weights, state)
                message = f"training stopped at step {state.step} of {total_steps}; continue with --resume"
                raise Cancelled(message if isinstance(error, Cancelled) else f"{message} ({error})") from None
    if not config.checkpoint_path.is_file() or state.step % config.steps_per_epoch:
        _save_checkpoint(config.checkpoint_path, network, best_weights, state)
    card.training = _training_record(config, state, data, started, synthesis_record)
    save_model(_export(network, best_weights), card, config.output)
    card.export = {"onnx": export_onnx(config.output)}  # what segmenting runs, beside the .keras file
    return TrainingResult(config.output, card, state.history, network, state.step, round(state.seconds, 1))


def _end_epoch(config, card, network, state: _State, best_weights, validation, data, started, synthesis_record):
    """Validate, keep the best weights, save model, checkpoint and curves, log one line."""
    epoch = state.step // config.steps_per_epoch
    validation_loss = float(
        network.evaluate(*validation, batch_size=config.batch_size, verbose=0, return_dict=True)["loss"]
    )
    entry = {
        "epoch": epoch,
        "step": state.step,
        "loss": round(state.epoch_loss_sum / config.steps_per_epoch, 6),
        "validation_loss": round(validation_loss, 6),
        "seconds": round(state.seconds, 1),
    }
    state.history.append(entry)
    state.epoch_loss_sum = 0.0
    improved = validation_loss < state.best_loss
    if improved:
        state.best_loss, state.best_epoch = validation_loss, epoch
        best_weights = network.get_weights()
        card.training = _training_record(config, state, data, started, synthesis_record)
        save_model(_export(network, best_weights), card, config.output)
    _save_checkpoint(config.checkpoint_path, network, best_weights, state)
    write_loss_curves(state.history, config.curves_path)
    log.info(
        "epoch %d/%d: loss %.4f, validation loss %.4f%s, %.0f s",
        epoch,
        config.epochs,
        entry["loss"],
        validation_loss,
        " (best, saved)" if improved else "",
        state.seconds,
    )
    return best_weights


def _label_maps(config: TrainingConfig, card: ModelCard) -> list:
    """The label maps crops are synthesised from, on the model's grid: the other knees', then the training pairs' (their range)."""
    sources = [(path, bones, None) for path, bones in config.synthetic_maps]
    if config.synthesize_training_labels:
        sources += [(path, None, config.train_range_i) for path in config.labels]
    label_maps = []
    for path, bones, train_range_i in sources:
        label_map = prepare_label_map(
            read_mask(path), bones, card.spacing_mm, train_range_i, name=path.name, soft_labels=config.soft_labels
        )
        label_map.record["sha256"] = _sha256(path)
        label_maps.append(label_map)
    return label_maps


def _check_output(config: TrainingConfig) -> None:
    if config.resume or config.overwrite:
        return
    existing = [p for p in (config.output, config.checkpoint_path) if p.exists()]
    if existing:
        raise InputError(f"{existing[0]} exists; pass --resume to continue that training or --overwrite to start again")
    if not config.output.parent.is_dir():
        raise InputError(f"{config.output.parent} does not exist; create the folder for the model first")


def _initial_network(config: TrainingConfig):
    """The network to train and the card it will be saved with."""
    if config.initial_model is not None:
        if Path(config.initial_model).suffix != ".keras":
            raise InputError(
                f"{config.initial_model}: fine-tuning starts from the .keras file (an .onnx file holds no trainable weights)"
            )
        start = load_model(config.initial_model)
        card = ModelCard(
            name=config.name or config.output.stem,
            architecture=dict(start.card.architecture),
            patch_size=start.card.patch_size,
            stride=start.card.stride,
            normalization=dict(start.card.normalization),
            spacing_mm=start.card.spacing_mm,
        )
        log.info("Fine-tuning %s: patch size, normalisation and spacing come from its card", config.initial_model)
        return start.network.network, card  # the Keras model inside the engine wrapper
    architecture = {"base_filters": int(config.base_filters), "depth": int(config.depth)}
    if config.norm_layer != "batch":  # the shipped cards predate the choice and mean batch norm
        architecture["normalization"] = config.norm_layer
    dimensions = ARCHITECTURES[config.architecture].dimensions
    if dimensions == 2:  # cards without the entry mean 3D sub-volumes
        architecture["dimensions"] = dimensions
    from ..network.unet import build_unet  # noqa: PLC0415  (Keras: 7.5 s, only when a network is built)

    try:
        # A 2D network takes slices of any size: it predicts whole slices, trained on crops of them.
        network = build_unet(patch_size=config.patch_size if dimensions == 3 else None, **architecture)
    except ValueError as error:
        raise InputError(f"cannot build the network: {error}") from None
    card = ModelCard(
        name=config.name or config.output.stem,
        architecture=architecture,
        patch_size=config.patch_size,
        stride=config.stride,
        projections=ARCHITECTURES[config.architecture].projections,
        fusion=ARCHITECTURES[config.architecture].fusion,
        normalization=dict(config.normalization),
        spacing_mm=[float(config.spacing_mm)] * 3 if config.spacing_mm else None,
    )
    return network, card


def _export(network, weights):
    """An uncompiled copy of ``network`` holding ``weights``: the shipped file carries no optimiser state."""
    copy = type(network).from_config(network.get_config())
    copy.set_weights(weights)
    return copy


def _signature(config: TrainingConfig) -> dict:
    """The settings a resumed run must share with the run it continues (all but length and output handling)."""
    settings = asdict(config)
    for name in ("epochs", "max_minutes", "resume", "overwrite", "progress_bar", "output"):
        settings.pop(name)
    return json.loads(json.dumps(settings, default=lambda value: Path(value).name))


def _save_checkpoint(path: Path, network, best_weights, state: _State) -> None:
    """Write the checkpoint atomically (a stopped write never leaves a broken one)."""
    import keras

    arrays = {f"weight{n}": w for n, w in enumerate(network.get_weights())}
    arrays.update({f"best{n}": w for n, w in enumerate(best_weights)})
    arrays.update({f"optimizer{n}": keras.ops.convert_to_numpy(v) for n, v in enumerate(network.optimizer.variables)})
    arrays["state"] = np.array(json.dumps(asdict(state)))
    with atomic_file(path) as partial, open(partial, "wb") as file:
        np.savez(file, **arrays)


def _load_checkpoint(path: Path, network, signature: dict):
    """Restore weights and optimiser variables; return the run's state and the best weights so far."""
    with np.load(path, allow_pickle=False) as stored:
        state = _State(**json.loads(str(stored["state"])))
        if state.signature != signature:
            changed = sorted(k for k in signature if signature.get(k) != (state.signature or {}).get(k))
            raise InputError(
                f"{path} was made with other settings ({', '.join(changed)}); resume with the same ones or start again with --overwrite"
            )
        count = len(network.get_weights())
        network.set_weights([stored[f"weight{n}"] for n in range(count)])
        best_weights = [stored[f"best{n}"] for n in range(count)]
        for n, variable in enumerate(network.optimizer.variables):
            variable.assign(stored[f"optimizer{n}"])
    return state, best_weights


def _training_record(
    config: TrainingConfig, state: _State, data: list, started: datetime.datetime, synthesis_record: list
) -> dict:
    """The card's ``training`` entry: enough to reproduce the run and to judge it."""
    synthesis = {
        "fraction": config.synthetic_fraction,
        "label_maps": synthesis_record,
        "settings": asdict(config.synthesis),
    }
    return {
        "command": command_line(config),
        "data": data,
        **({"synthesis": synthesis} if synthesis_record else {}),
        "initial_model": config.initial_model.name if config.initial_model else None,
        "sampling": {
            "patch_size": int(config.patch_size),
            "batch_size": config.batch_size,
            "boundary_fraction": config.boundary_fraction,
            "validation": f"{config.validation_patches} fixed unaugmented sub-volumes of the training data (seeded)",
        },
        "augmentation": asdict(config.augmentation),
        "loss": {"binary_crossentropy": 1.0, "soft_dice": config.dice_weight},
        "optimizer": {"name": "adam", "learning_rate": config.learning_rate},
        "seed": config.seed,
        "epochs": len(state.history),
        "steps_per_epoch": config.steps_per_epoch,
        "steps": state.step,
        "best_epoch": state.best_epoch,
        "best_validation_loss": None if state.best_epoch is None else round(state.best_loss, 6),
        "history": state.history,
        "seconds": round(state.seconds, 1),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
    }


def _machine() -> dict:
    import keras

    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "cpus": available_cores(),
        "devices": _devices(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "keras": keras.__version__,
        "backend": keras.config.backend(),
    }


def _devices() -> list[str]:
    """The devices the backend trains on, as Keras names them (its torch backend has no device list)."""
    import keras

    if keras.config.backend() == "torch":
        import torch

        return [f"cuda:{n}" for n in range(torch.cuda.device_count())] or ["cpu:0"]
    return [str(device) for device in keras.distribution.list_devices()]


def _sha256(path: Path) -> str | None:
    """Checksum of a data file, so a card names exactly what it was trained on (None for a DICOM folder)."""
    return file_sha256(path) if path.is_file() else None
