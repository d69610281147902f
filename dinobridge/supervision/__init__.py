"""Semantic supervision from a frozen DINO teacher, usable from any training loop.

Train another model (the *student*: a text encoder, a VAE, a generator, ...) so that a projection of its
features agrees with a frozen, stop-gradient DINOv2/DINOv3 teacher (seeds 000/001):

* :class:`FrozenTeacher` - frozen backbone (``requires_grad=False``, always eval, ``no_grad`` forward) returning
  CLS [B, D] and patch tokens [B, N, D]; built from a module with ``forward_features``, from
  ``dinobridge.hub`` (:meth:`FrozenTeacher.from_hub`) or from Hugging Face (:meth:`FrozenTeacher.from_hf`);
* :class:`StudentProjection` - linear / small MLP from the student dimension to the teacher dimension;
* losses - :class:`CosineAlignLoss` (default), :class:`NormalizedMSELoss` (optional batch / running whitening),
  :class:`VICRegAlignLoss` (variance / covariance on the student only, gathered across ranks with gradient);
* :class:`LinearWarmup` - ``weight(step) = w * min(1, step / warmup_steps)``;
* :class:`SemanticSupervision` - all of the above, plus optional g x g pooled patch alignment.

Example::

    from dinobridge.supervision import FrozenTeacher, SemanticSupervision

    teacher = FrozenTeacher.from_hub("dinov3_vitl16", weights="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")
    sup = SemanticSupervision(teacher, student_dim=512, loss="cosine", weight=0.2, warmup_steps=5000,
                              patch_grid=2, student_patch_dim=4).to(device)
    opt = torch.optim.AdamW(list(student.parameters()) + list(sup.parameters()), lr=1e-4)  # teacher is frozen

    for step, (images01, batch) in enumerate(loader):       # images01: [B, 3, H, W] in [0, 1], H, W % 16 == 0
        feats, latent_map = student(batch)                  # [B, 512], [B, 4, 32, 32]
        terms = sup(feats, teacher.normalize(images01.to(device)), step=step, student_patch=latent_map)
        loss = task_loss(feats, batch) + terms["loss"]      # "cls", "patch", "weight": detached, for logging
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

Under DDP wrap the student (and ``sup``; the teacher's frozen parameters are ignored by DDP). With
``loss="vicreg"`` every rank must call ``sup`` every step with the same batch size.
"""

from dinobridge.distributed.comm import dist_active, gather_no_grad, gather_with_grad
from .hf_adapter import HFBackboneAdapter
from .losses import LOSSES, CosineAlignLoss, NormalizedMSELoss, VICRegAlignLoss, build_alignment_loss
from .pooling import pool_feature_map, pool_patch_tokens
from .projection import StudentProjection
from .semantic import SemanticSupervision
from .teacher import IMAGENET_MEAN, IMAGENET_STD, SAT493M_MEAN, SAT493M_STD, FrozenTeacher, TeacherOutput
from .warmup import LinearWarmup

__all__ = [
    "FrozenTeacher",
    "TeacherOutput",
    "HFBackboneAdapter",
    "StudentProjection",
    "CosineAlignLoss",
    "NormalizedMSELoss",
    "VICRegAlignLoss",
    "build_alignment_loss",
    "LOSSES",
    "LinearWarmup",
    "SemanticSupervision",
    "pool_patch_tokens",
    "pool_feature_map",
    "gather_with_grad",
    "gather_no_grad",
    "dist_active",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAT493M_MEAN",
    "SAT493M_STD",
]
