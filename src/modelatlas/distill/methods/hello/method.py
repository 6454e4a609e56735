"""HeLlO: distil the labels into a projector, not a table (Yu et al., "Heavy Labels Out", 2024/2025).

  (1) train a teacher on real data (``teacher_steps`` SGD steps; cached, so trained once per data and
      settings); its feature extractor is the frozen backbone;
  (2) initialise the synthetic images (real, ``ipc`` per class, or a given set such as DM's) and the projector
      head (text embeddings of the class names, or class-mean features), :class:`~.projector.LabelProjector`;
  (3) fit the LoRA matrices (and scale, bias) to the teacher's soft labels: Adam on KL(teacher || projector)
      over DSA-augmented synthetic images and real batches (``projector_steps``);
  (4) nudge the images: ``iterations`` Adam steps on S minimising the same KL on augmented S (outer loop,
      resumable);
  (5) store images + the projector's trainable tensors (+ the backbone weights for convenience, counted
      separately); evaluation generates labels on the fly (``meta["label_generator"]``).
Time O(teacher_steps + projector_steps + iterations) x batch x net cost; memory O(network + batch).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from modelatlas.atomic import atomic_save_tensors, read_tensors
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.augment import DSA
from modelatlas.distill.cache import cache_key, cache_root, check_cache_folder, device_type, trained_on
from modelatlas.distill.evaluate import soft_cross_entropy
from modelatlas.distill.interrupt import deferred_interrupt
from modelatlas.distill.methods.base import DistillContext, init_synthetic
from modelatlas.distill.methods.hello.config import HelloConfig
from modelatlas.distill.methods.hello.projector import LabelProjector, text_head
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import CheckpointError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator

LABEL_GENERATOR = "modelatlas.distill.methods.hello.method:make_label_fn"
STOP_MESSAGE = ("interrupted: finishing the teacher and caching it, then stopping; a rerun starts after it "
                "(Ctrl-C again to stop at once, losing the teacher)")


def load_or_train_teacher(train: ArrayDataset, config: HelloConfig, seed: int, device,
                          progress: Progress | None = None) -> tuple[torch.nn.Module, Path, bool]:
    """Step (1) once per (data, teacher settings, seed): (teacher, its cache file, whether trained now).

    The teacher is cached like MTT's experts (:mod:`modelatlas.distill.cache`, kind "hello"), so a second
    run (another ``init``, projector or image setting), or one after a Ctrl-C or crash in steps (2)-(5), skips
    the ``teacher_steps`` of training. A first Ctrl-C during them finishes and caches the teacher, then stops."""
    spec = config.net_spec(train.input_shape)
    fields = {**spec, "steps": config.teacher_steps, "lr": config.lr_teacher, "batch": config.batch_real}
    path = cache_root("hello", config.cache_dir) / f"teacher-{cache_key(train, fields, seed)}.safetensors"
    if not path.is_file():
        check_cache_folder(path.parent, config.cache_dir)
        with deferred_interrupt(message=STOP_MESSAGE) as stopping:  # a first Ctrl-C: the teacher is finished
            net = train_teacher(train, config, seed, device, progress)
            # made contiguous on the CPU there: an entry holds no device (cache.py)
            atomic_save_tensors(path, net.state_dict(), {"key": path.stem, "device": device_type(device)})
            if stopping():
                raise KeyboardInterrupt
        return net, path, True
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"], seed=0,
                   device=device)
    try:
        net.load_state_dict(read_tensors(path, "delete it to retrain the teacher"))
    except RuntimeError as err:
        raise CheckpointError(path, f"not a teacher of this network ({err}); delete it to retrain") from None
    if not all(bool(torch.isfinite(v).all()) for v in net.state_dict().values()):  # NaN labels: 'diverged'
        raise CheckpointError(path, "not a teacher of this network (NaN or infinite weights); delete it to retrain")
    return net.to(device).eval().requires_grad_(False), path, False


def train_teacher(train: ArrayDataset, config: HelloConfig, seed: int, device,
                  progress: Progress | None = None) -> torch.nn.Module:
    """Step (1): a ConvNet trained on real data with DSA (SGD lr, momentum 0.9, wd 5e-4, random batches);
    ``progress``: a bar over the steps, 'hello: train teacher'."""
    spec = config.net_spec(train.input_shape)
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"],
                   seed=derive_seed(seed, "hello-teacher"), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=config.lr_teacher, momentum=0.9, weight_decay=5e-4)
    gen = torch_generator(derive_seed(seed, "hello-teacher-data"))
    dsa = DSA.for_dataset(train.input_shape) if len(train.input_shape) == 3 else None
    bar = resolve(progress)(range(config.teacher_steps), total=config.teacher_steps, desc="hello: train teacher")
    for _ in bar:
        idx = torch.randint(len(train), (min(config.batch_real, len(train)),), generator=gen)
        xb = train.x[idx].to(device)
        if dsa is not None:
            xb = dsa.sample(gen, batch=len(xb)).apply(xb)
        loss = soft_cross_entropy(net(xb), train.y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    return net.eval().requires_grad_(False)


def make_projector(teacher, syn: SyntheticSet, config: HelloConfig, seed: int, encode=None) -> LabelProjector:
    """Step (2): projector on the teacher's features, head from text or from class-mean features."""
    dim = teacher.feature_dim
    proj_seed = derive_seed(seed, "hello-proj")
    if config.head_init == "text":
        head = sized_text_head(syn.class_names, config.text_dim, encode)
        return LabelProjector(teacher, dim, head, config.rank, proj_seed).to(syn.images.device)
    tmp = LabelProjector(teacher, dim, torch.zeros(syn.num_classes, config.text_dim), config.rank, proj_seed)
    tmp = tmp.to(syn.images.device)
    with torch.no_grad():
        z = tmp.features(syn.images)  # (N, E)
        head = torch.stack([z[syn.classes == c].mean(0) for c in range(syn.num_classes)])  # (K, E)
    return LabelProjector(teacher, dim, F.normalize(head, dim=1).cpu(), config.rank, proj_seed,
                          store_head=True).to(syn.images.device)


def sized_text_head(names: list[str], dim: int, encode=None) -> torch.Tensor:
    """(K, dim) unit-norm text head: the embeddings cut or zero-padded to ``dim`` (MiniLM: 384, unchanged)."""
    head = text_head(names, encode)  # (K, E)
    head = head[:, :dim] if head.shape[1] >= dim else F.pad(head, (0, dim - head.shape[1]))
    return F.normalize(head, dim=1)


def gap(teacher, projector, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher soft labels || projector), batch mean."""
    with torch.no_grad():
        t = F.softmax(teacher(x) / temperature, dim=1)
    return F.kl_div(F.log_softmax(projector(x) / temperature, dim=1), t, reduction="batchmean")


def fit_projector(projector, teacher, syn: SyntheticSet, train: ArrayDataset, config: HelloConfig, seed: int,
                  progress=None) -> list[float]:
    """Step (3): Adam on the projector's trainable tensors; returns the loss per step (``progress``: a bar,
    'hello: fit projector'; it was taken and not used)."""
    opt = torch.optim.Adam(projector.trainable(), lr=config.lr_projector)
    gen = torch_generator(derive_seed(seed, "hello-projector"))
    dsa = DSA.for_dataset(train.input_shape) if len(train.input_shape) == 3 else None
    x_syn, dev, losses = syn.images.detach(), syn.images.device, []
    bar = resolve(progress)(range(config.projector_steps), total=config.projector_steps,
                            desc="hello: fit projector")
    for _ in bar:
        idx = torch.randint(len(train), (min(config.batch_real, len(train)),), generator=gen)
        xb = torch.cat([x_syn, train.x[idx].to(dev)])  # (N + B, C, H, W)
        if dsa is not None:
            xb = dsa.sample(gen, batch=len(xb)).apply(xb)
        loss = gap(teacher, projector, xb, config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
    return losses


def run(train: ArrayDataset, ipc: int, config: HelloConfig, ctx: DistillContext) -> SyntheticSet:
    teacher, teacher_path, trained = load_or_train_teacher(train, config, ctx.seed, ctx.device, ctx.progress)
    syn = init_synthetic(train, ipc, config.init, ctx).to(ctx.device)
    projector = make_projector(teacher, syn, config, ctx.seed)
    fit_losses = fit_projector(projector, teacher, syn, train, config, ctx.seed, ctx.progress)
    img_opt = torch.optim.Adam([syn.images], lr=config.lr_img)
    dsa = DSA.for_dataset(train.input_shape) if len(train.input_shape) == 3 else None

    def step(it: int, g: torch.Generator) -> float:  # step (4)
        x = dsa.sample(g, batch=len(syn)).apply(syn.images) if dsa is not None else syn.images
        loss = gap(teacher, projector, x, config.temperature)
        img_opt.zero_grad(set_to_none=True)
        loss.backward()
        img_opt.step()
        return float(loss.detach())

    ctx.run_loop(config.iterations, config.checkpoint_every, step,
                 {"synthetic": syn, "optimizer": img_opt, "projector": projector}, "hello")
    syn.extras.update({f"projector.{k}": v for k, v in projector.stored_state().items()})
    syn.extras.update({f"backbone.{k}": v.detach() for k, v in teacher.state_dict().items()
                       if k.startswith("features.")})
    spec = config.net_spec(train.input_shape)
    syn.meta.update({"label_generator": LABEL_GENERATOR, "projector_fit_losses": fit_losses[-1:],
                     "teacher": str(teacher_path), "teacher_trained_now": trained,
                     "teacher_device": trained_on(teacher_path),
                     "hello": {**spec, "rank": config.rank, "head_init": config.head_init,
                               "text_dim": config.text_dim, "proj_seed": derive_seed(ctx.seed, "hello-proj"),
                               "temperature": config.temperature, "input_shape": list(train.input_shape)}})
    return syn.to("cpu")


def projector_from_set(syn: SyntheticSet, device, encode=None) -> LabelProjector:
    """Rebuild the projector of a HeLlO set: backbone and trainable tensors from ``extras``, W0/P regenerated."""
    info = syn.meta["hello"]
    net = make_net(info["net"], tuple(info["input_shape"]), syn.num_classes, info["width"], info["depth"], seed=0)
    net.load_state_dict({k[9:]: v for k, v in syn.extras.items() if k.startswith("backbone.")}, strict=False)
    store = info["head_init"] == "class_mean"
    head = syn.extras["projector.W0"] if store else sized_text_head(syn.class_names, info["text_dim"], encode)
    proj = LabelProjector(net, net.feature_dim, head.cpu(), info["rank"], info["proj_seed"], store_head=store)
    proj.load_state_dict({k[10:]: v for k, v in syn.extras.items() if k.startswith("projector.")}, strict=False)
    return proj.to(device).eval()


def make_label_fn(syn: SyntheticSet, device, encode=None):
    """On-the-fly labels for evaluation: softmax(projector(augmented batch) / T)."""
    proj, temp = projector_from_set(syn, device, encode), float(syn.meta["hello"]["temperature"])

    def label_fn(xb: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        with torch.no_grad():
            return F.softmax(proj(xb) / temp, dim=1)
    return label_fn
