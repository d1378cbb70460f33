"""The SpacTor objective: (loss, metrics) of one micro-batch, in either phase of the curriculum.

    from spactor_mega.curriculum import Phase
    from spactor_mega.model.spactor import SpactorObjective
    from spactor_mega.model.stages import build_spactor_modules

    d, g, rtd = build_spactor_modules(cfg, vocab_size)            # g, rtd None when tau == 0
    objective = SpactorObjective.from_config(cfg, mask_id=tok.mask_id, sample_vocab_size=tok.sp_size)
    loss, metrics = objective(batch, d, g, rtd, phase=Phase.HYBRID)
    loss.backward()        # or Megatron's schedule: return loss from the forward_step_func

``Phase.HYBRID`` (step < tau): G is fed the encoder input with ``mask_id`` at the MLM positions,
its MLM loss is taken there (vocab-parallel CE, weighted mean), replacements are Gumbel-max sampled
(no grad; the noise keyed by each sample's own key), D reads the encoder input with the samples at
those positions, the RTD head labels every real encoder token replaced-or-not (BCE, mean over
real tokens), and the decoder's SC loss is the mean CE over target tokens:
``total = mlm_weight * L_mlm + rtd_weight * L_rtd + L_sc`` (+ the z-loss when on).
``Phase.SC_ONLY``: only D runs; ``total = L_sc``. G, masking and the RTD head are not touched.

Megatron DDP: wrap D, G and the RTD head separately (``DistributedDataParallel(config, ddp_config,
module)``; G in :class:`~spactor_mega.model.generator.GeneratorDDP`, which reduces over TP x DP
because each TP rank runs G on its own rows), one ``get_megatron_optimizer`` per wrapped group
(G and the RTD head may share one as two model chunks); at tau drop G's and the head's wrappers
and optimizer. G borrows D's embedding without registering it, so the embedding's gradient (from
D and G) accumulates in D's DDP buffer only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from spactor_mega.curriculum import Phase
from spactor_mega.data.host_side import encoder_padding, sample_keys
from spactor_mega.seeding import seed_from

from .generator import T5Generator, gumbel_max_sample
from .heads import RTDHead
from .losses import masked_mean, rtd_loss, rtd_stats, sc_accuracy, sc_loss, vocab_parallel_argmax, vocab_parallel_ce
from .t5 import T5Discriminator


# The hybrid step's own metrics, in the order discriminator_losses computes them (then the SC ones).
HYBRID_METRICS = ("loss", "sc_loss", "mlm_loss", "rtd_loss", "rtd_accuracy", "rtd_precision", "rtd_recall",
                  "replaced_fraction", "mlm_accuracy")


def unwrap(module):
    """The model inside Megatron wrappers (DDP, Float16Module): the step calls its methods
    (encode/decode/...) directly. DDP's gradient hooks sit on the parameters, so they still fire."""
    while module is not None and hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


@dataclass
class SpactorObjective:
    """Static settings of the objective; call it per micro-batch."""

    mask_id: int
    sample_vocab_size: int  # ids >= this are never sampled (sentinels, mask, padded rows)
    forbidden_ids: Sequence[int] = (0, 1)  # pad, EOS
    mlm_weight: float = 1.0
    rtd_weight: float = 10.0
    temperature: float = 1.0
    seed: int = 1234
    z_loss: float = 0.0  # T5X's auxiliary z-loss on D's LM logits (0: off; T5X uses 1e-4)
    # The SC loss's (+ z-loss's) weight in the hybrid total: 1 in training; 0 selects the auxiliary
    # loss alone for the gradient agreement (spactor_mega.training.grad_agreement)
    sc_weight: float = 1.0

    @classmethod
    def from_config(cls, cfg, *, mask_id: int, sample_vocab_size: int, forbidden_ids=(0, 1)):
        return cls(
            mask_id=mask_id,
            sample_vocab_size=sample_vocab_size,
            forbidden_ids=tuple(forbidden_ids),
            mlm_weight=cfg.spactor.mlm_weight,
            rtd_weight=cfg.spactor.rtd_weight,
            temperature=cfg.generator.temperature,
            seed=cfg.train.seed,
            z_loss=cfg.spactor.z_loss,
        )

    def __call__(
        self,
        batch: dict,
        discriminator: T5Discriminator,
        generator: Optional[T5Generator] = None,
        rtd_head: Optional[RTDHead] = None,
        *,
        phase: Phase = Phase.HYBRID,
    ):
        """Returns ``(total_loss, metrics)``; metrics are detached 0-d tensors on the batch's
        device: reading them on the host is a GPU sync, so the engines average them on the device and
        read them once per step, not per micro-batch. The host-side
        facts of ``batch`` (:mod:`spactor_mega.data.host_side`) spare the step any other read.
        Modules may be given wrapped in Megatron DDP / Float16Module."""
        discriminator, generator, rtd_head = unwrap(discriminator), unwrap(generator), unwrap(rtd_head)
        if phase is Phase.SC_ONLY:
            return self.sc_step(batch, discriminator)
        if phase is not Phase.HYBRID:
            raise ValueError(f"phase must be a Phase, got {phase!r}")
        if generator is None or rtd_head is None:
            raise ValueError("the hybrid phase needs the generator and the RTD head")
        return self.hybrid_step(batch, discriminator, generator, rtd_head)

    # ---- stages -----------------------------------------------------------------------------
    def sc_step(self, batch: dict, d: T5Discriminator):
        enc_mask, padded = batch["enc_mask"], encoder_padding(batch)
        encoder_hidden = d.encode(batch["enc_tokens"], enc_mask, padded)
        decoder_hidden = d.decode(batch["dec_input"], encoder_hidden, enc_mask, padded)
        return self.discriminator_losses(batch, d, None, encoder_hidden, decoder_hidden, None)

    def generator_pass(self, batch: dict, d, g) -> dict:
        """G's half of the hybrid step: MLM logits on the masked encoder input, Gumbel-max
        replacements, D's input. Returns ``mlm_loss`` (with graph), ``d_input``, ``is_replaced``,
        ``mlm_accuracy`` (0-d tensor) and ``sampled``. (A pipeline runs this on stage 0 only.)"""
        enc = batch["enc_tokens"]
        enc_mask = batch["enc_mask"].bool()
        positions = batch["mlm_positions"]
        targets = batch["mlm_targets"]
        weights = batch["mlm_weights"].float()
        real = weights > 0

        # Which encoder positions G sees masked (scatter_add: padded slots point at 0 and add 0).
        hits = torch.zeros_like(enc).scatter_add_(1, positions, real.long())
        masked = hits > 0
        g_logits = g(torch.where(masked, torch.full_like(enc, self.mask_id), enc), enc_mask, positions,
                     has_padding=encoder_padding(batch))

        with torch.no_grad():
            sampled = gumbel_max_sample(
                g_logits.detach(),
                temperature=self.temperature,
                row_seeds=[seed_from(self.seed, key) for key in sample_keys(batch)],
                sample_vocab_size=self.sample_vocab_size,
                forbidden_ids=self.forbidden_ids,
            )  # [b, m]
            mlm_correct = (vocab_parallel_argmax(g_logits.detach()) == targets).float()
            fill = torch.zeros_like(enc).scatter_add_(1, positions, torch.where(real, sampled, 0))
            d_input = torch.where(masked, fill, enc)
            is_replaced = masked & (d_input != enc)
            mlm_accuracy = masked_mean(mlm_correct, weights)

        mlm_loss = masked_mean(vocab_parallel_ce(g_logits, targets), weights)  # consumes g_logits
        return dict(mlm_loss=mlm_loss, d_input=d_input, is_replaced=is_replaced, mlm_accuracy=mlm_accuracy,
                    sampled=sampled)

    def discriminator_losses(self, batch: dict, d, rtd_head, encoder_hidden, decoder_hidden, gen: Optional[dict]):
        """D's losses from its final hidden states ``[s, b, h]``. ``gen`` None: SC only. Otherwise
        the output of :meth:`generator_pass` (or its broadcast: ``is_replaced``, ``mlm_loss``,
        ``mlm_accuracy``); a ``mlm_loss`` with a graph is part of the returned loss, a detached
        one (a pipeline, where G's backward already ran on stage 0) only of the reported total."""
        lm_logits = d.lm_logits(decoder_hidden)
        sc_metrics = {"sc_accuracy": sc_accuracy(lm_logits, batch["labels"], batch["dec_loss_mask"]).detach()}
        l_sc, l_z = sc_loss(lm_logits, batch["labels"], batch["dec_loss_mask"], self.z_loss)
        if l_z is not None:
            l_sc_total = l_sc + l_z
            sc_metrics["z_loss"] = l_z.detach().float()
        else:
            l_sc_total = l_sc
        if gen is None:
            # copies (stack): Megatron's schedule divides the returned loss in place
            values = torch.stack([l_sc_total.detach(), l_sc.detach()]).float().unbind()
            return l_sc_total, {**dict(zip(("loss", "sc_loss"), values)), **sc_metrics}
        enc_mask = batch["enc_mask"].bool()
        is_replaced = gen["is_replaced"]
        rtd_logits = rtd_head(encoder_hidden).transpose(0, 1)  # [b, s]
        l_rtd = rtd_loss(rtd_logits, is_replaced, enc_mask)
        mlm_loss = gen["mlm_loss"]
        if self.sc_weight != 1.0:  # training keeps the term as it is (no extra op in its graph)
            l_sc_total = self.sc_weight * l_sc_total
        total = self.mlm_weight * mlm_loss + self.rtd_weight * l_rtd + l_sc_total
        loss = total if mlm_loss.requires_grad else self.rtd_weight * l_rtd + l_sc_total
        with torch.no_grad():
            values = torch.cat(
                [
                    torch.stack([total.detach(), l_sc.detach(), mlm_loss.detach(), l_rtd.detach()]).float(),
                    rtd_stats(rtd_logits.detach(), is_replaced, enc_mask),
                    gen["mlm_accuracy"].float().reshape(1),
                ]
            ).unbind()
        return loss, {**dict(zip(HYBRID_METRICS, values, strict=True)), **sc_metrics}

    def metric_names(self, phase: Phase) -> tuple[str, ...]:
        """The keys of a micro-batch's metrics in ``phase`` (a pipeline's stages without D's losses
        take part in the step's one reduction of them by these names)."""
        names = HYBRID_METRICS if phase is Phase.HYBRID else ("loss", "sc_loss")
        return names + ("sc_accuracy",) + (("z_loss",) if self.z_loss > 0 else ())

    def hybrid_step(self, batch: dict, d, g, rtd_head):
        gen = self.generator_pass(batch, d, g)
        enc_mask, padded = batch["enc_mask"].bool(), encoder_padding(batch)
        encoder_hidden = d.encode(gen["d_input"], enc_mask, padded)
        decoder_hidden = d.decode(batch["dec_input"], encoder_hidden, enc_mask, padded)
        total, metrics = self.discriminator_losses(batch, d, rtd_head, encoder_hidden, decoder_hidden, gen)
        self.last_samples = gen["sampled"]  # the replacements of this call (detached [b, m]; tests, debugging)
        return total, metrics
