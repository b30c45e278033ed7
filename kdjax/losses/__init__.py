"""Distillation losses: next-token cross-entropy, teacher/student divergences, feature losses.

Shape letters (the glossary is in kdjax/__init__.py): B batch, L length, D width, V vocab, M mapped
layer pairs. Prefix `t_` is the teacher, `s_` the student. The package knows no model and no
training step: it takes logits, hidden states or attention maps and returns float32 scalars (means
over unmasked tokens).

  divergences   the one registry DIVERGENCES: name -> Divergence (a per-token function on float32
                log-probabilities; calling it gives T^2 times the masked mean), cross_entropy,
                the alpha blend distillation_loss, agreement and accuracy metrics, and the
                masking and 0 log 0 = 0 primitives the other loss modules share
  chunked       chunked_distillation_loss: the same loss from final hidden states, fused with the
                unembeddings and chunked over tokens under a custom VJP (no [B, L, V] logits);
                chunked_cross_entropy, the same without a teacher
  features      hidden_state_loss (HIDDEN_LOSSES) and attention_kl, for feature distillation

Adding a divergence is one per-token function and one line in DIVERGENCES: soft_loss,
distillation_loss, the chunked loss and config_check (distill.loss) all read that registry.
Everything is re-exported here, so callers write `from kdjax import losses; losses.forward_kl`.
"""

from kdjax.losses.chunked import (chunked_cross_entropy, chunked_distillation_loss,
                                  length_chunks, logits_from_hidden)
from kdjax.losses.divergences import (DIVERGENCES, Divergence, blend, check_pair, cross_entropy,
                                      cross_entropy_BxL, distillation_loss, divergence,
                                      forward_kl, generalized_jsd, is_static, kl_BxL, log_probs,
                                      masked_mean, reverse_kl, shared_vocab, skew_kl,
                                      skew_reverse_kl, soft_loss, token_accuracy, top1_agreement,
                                      tvd, upcast)
from kdjax.losses.features import HIDDEN_LOSSES, attention_kl, hidden_state_loss

__all__ = [
    "DIVERGENCES", "HIDDEN_LOSSES", "Divergence", "attention_kl", "blend", "check_pair",
    "chunked_cross_entropy", "chunked_distillation_loss", "cross_entropy", "cross_entropy_BxL",
    "distillation_loss", "divergence", "forward_kl", "generalized_jsd", "hidden_state_loss",
    "is_static", "kl_BxL", "length_chunks", "log_probs", "logits_from_hidden", "masked_mean",
    "reverse_kl", "shared_vocab", "skew_kl", "skew_reverse_kl", "soft_loss", "token_accuracy",
    "top1_agreement", "tvd", "upcast",
]
