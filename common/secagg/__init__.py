"""Secure-aggregation (SecAgg+) primitives that the hospitals and the coordinator must agree on.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS
2020), built on SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017). A hospital sends

    y_u = n_u * quantize(delta_u) + PRG(b_u) + sum_v sign(u, v) * PRG(s_uv)   (mod M)

followed by one more element, its example count n_u, masked the same way. The pairwise masks
PRG(s_uv) cancel in the sum over hospitals; the self masks PRG(b_u) and the pairwise masks of
hospitals that dropped out are removed by the coordinator from Shamir shares that the surviving
neighbours reveal. Only the sum is ever unmasked.

Against an active coordinator (Bonawitz et al. 2017, section 6; Bell et al. 2020): every hospital
signs its advertised keys with its long-term Ed25519 key, bound to run, round, node and the
round's public parameters (`key_statement`), and its peers check the signature against the
federation roster they accepted out of band, so the coordinator cannot swap in keys of its own.
Before anything is unmasked, every survivor signs the survivor set it was told
(`survivor_statement`); a hospital reveals shares only after it sees `consistency_quorum` valid
signatures on that same set, so two hospitals can never be told different dropout stories. That
quorum is a majority only (2 when 3 take part), so it says nothing about how few updates are
unmasked together: each hospital also holds the survivor set to its own site minimum
(`min_secure_aggregation_hospitals`, see `client.secagg`). The reconstruction threshold is at
least a majority of a neighbourhood (`secure_threshold`), so no two disjoint groups of hospitals
can each rebuild one secret of the same hospital.

Everything here is pure (no I/O, no state): quantization, the modulus check, the neighbour graph,
the thresholds, Shamir secret sharing, key agreement, share encryption and mask expansion. The
primitives come from `cryptography`: X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305 for the
shares in transit, AES-256-CTR as the mask PRG (hardware-accelerated, several times faster than
the ChaCha20 keystream here) and Ed25519 for signatures; seeds are 256 bits. Shamir sharing is
written here over the Mersenne prime field 2**521 - 1, so a 32-byte secret is one field element.

Quantization and weighting. A delta value is clipped to [-clip, clip] and stochastically rounded to
an integer q in [0, 2**bits - 1] (unbiased). The hospital multiplies q by its example count n_u;
the coordinator recovers sum_u n_u * q_u and sum_u n_u (the count slot), and the weighted sum of
deltas is step * sum_u n_u * q_u - clip * sum_u n_u with step = 2 * clip / (2**bits - 1). The
modulus is the smallest power of two above num_hospitals * max_weight * (2**bits - 1), so the sum
can never wrap; it must fit in 64 bits (`check_modulus`). The error of the weighted average is
below one quantization step per coordinate (`quantization_bound`).

One job per module: `quantize`, `graph` (neighbours and thresholds), `shamir`, `crypto` (key
agreement, share encryption, signatures), `masks` (mask expansion and wire packing) and
`messages` (stages and payload checks).
"""

from fedward.common.secagg.crypto import (
    agree_key,
    binding,
    decrypt_share,
    encrypt_share,
    key_statement,
    pair_context,
    params_digest,
    survivor_statement,
    verify_signature,
)
from fedward.common.secagg.graph import (
    MAX_NODE_ID,
    check_node_ids,
    check_threshold,
    consistency_quorum,
    majority,
    mask_sign,
    round_seed,
    secagg_graph,
    secure_threshold,
    threshold_from_fraction,
)
from fedward.common.secagg.masks import (
    add_masks,
    expand_mask,
    pack_bits,
    reduce_modulus,
    sum_packed,
    unpack_bits,
)
from fedward.common.secagg.messages import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SHARE_KEYS,
    STAGES,
    UNMASK,
    check_header,
    header,
    read_field,
    read_list,
    read_node_keyed,
)
from fedward.common.secagg.quantize import (
    MAX_MODULUS_BITS,
    check_modulus,
    dequantize_sum,
    quantization_bound,
    quantization_step,
    quantize,
    weighted_field_vector,
)
from fedward.common.secagg.shamir import (
    FIELD_PRIME,
    SEED_BYTES,
    SHARE_BYTES,
    shamir_combine,
    shamir_split,
)

__all__ = [
    "ADVERTISE_KEYS",
    "CONSISTENCY_CHECK",
    "FIELD_PRIME",
    "MASKED_UPDATE",
    "MAX_MODULUS_BITS",
    "MAX_NODE_ID",
    "SEED_BYTES",
    "SHARE_BYTES",
    "SHARE_KEYS",
    "STAGES",
    "UNMASK",
    "add_masks",
    "agree_key",
    "binding",
    "check_header",
    "check_modulus",
    "check_node_ids",
    "check_threshold",
    "consistency_quorum",
    "decrypt_share",
    "dequantize_sum",
    "encrypt_share",
    "expand_mask",
    "header",
    "key_statement",
    "majority",
    "mask_sign",
    "pack_bits",
    "pair_context",
    "params_digest",
    "quantization_bound",
    "quantization_step",
    "quantize",
    "read_field",
    "read_list",
    "read_node_keyed",
    "reduce_modulus",
    "round_seed",
    "secagg_graph",
    "secure_threshold",
    "shamir_combine",
    "shamir_split",
    "sum_packed",
    "survivor_statement",
    "threshold_from_fraction",
    "unpack_bits",
    "verify_signature",
    "weighted_field_vector",
]
