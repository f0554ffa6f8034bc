"""The THD ``PackedSeqParams`` of a packed row say explicitly whether a slot holds padding.

Reference: the row's layout worked by hand. TE releases that infer ``pad_between_seqs`` compare
``cu_seqlens_q_padded[:-1]`` with ``cu_seqlens_q[:-1]`` (TE v2.12 ``dot_product_attention.py:1328-1338``)
and so call a row whose only padding is in its last slot unpadded; that rule is written out below as
``_te_value_rule`` to show each case is one it gets wrong or right.
"""

from __future__ import annotations

import torch

from scope_megatron.batch import PackedMicroBatch


def _row(cu: list[int], cu_padded: list[int] | None, cp_size: int = 1) -> PackedMicroBatch:
    total = (cu_padded or cu)[-1]
    return PackedMicroBatch(torch.zeros(1, total // cp_size, dtype=torch.long),
                            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                            cu_seqlens_padded=None if cu_padded is None else torch.tensor(cu_padded, dtype=torch.int32),
                            cp_size=cp_size)


def _te_value_rule(params) -> bool:
    return not torch.equal(params.cu_seqlens_q_padded[:-1], params.cu_seqlens_q[:-1])


def test_tail_padded_single_sequence_row_is_padded():
    """The CP sync-probe row: one sequence of 5 tokens in a slot rounded up to 2 * cp = 4 -> 8."""
    params = _row([0, 5], [0, 8], cp_size=2).packed_seq_params()
    assert params.pad_between_seqs is True
    assert not _te_value_rule(params)  # the inference this field overrides gets it wrong
    assert params.cu_seqlens_q.tolist() == [0, 5] and params.cu_seqlens_q_padded.tolist() == [0, 8]
    assert params.cu_seqlens_kv_padded.tolist() == [0, 8]


def test_padding_between_sequences_is_padded():
    params = _row([0, 3, 7, 11], [0, 4, 8, 12], cp_size=2).packed_seq_params()
    assert params.pad_between_seqs is True and _te_value_rule(params)
    assert params.cu_seqlens_q_padded.tolist() == [0, 4, 8, 12]


def test_row_without_padding_shares_one_tensor():
    for cu_padded in (None, [0, 3, 7, 12]):  # no padded bounds, or padded bounds equal to the real ones
        params = _row([0, 3, 7, 12], cu_padded).packed_seq_params()
        assert params.pad_between_seqs is False
        assert params.cu_seqlens_q_padded is params.cu_seqlens_q
        assert params.cu_seqlens_kv_padded is params.cu_seqlens_q and params.cu_seqlens_kv is params.cu_seqlens_q
        assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 5
