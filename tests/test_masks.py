import numpy as np

from perceiver_ar_t5x import masks


def test_mask_uses_true_positions_golden():
  # Latent queries at positions 3, 4 over keys at positions 0, 2, 3, 4 (1 dropped).
  q_pos = np.array([[3, 4]])
  k_pos = np.array([[0, 2, 3, 4]])
  mask = masks.attention_mask(q_pos, k_pos)
  expected = np.array([[[[1, 1, 1, 0],
                         [1, 1, 1, 1]]]], bool)
  np.testing.assert_array_equal(mask, expected)


def test_mask_respects_segments_golden():
  pos = np.array([[0, 1, 0, 1, 2]])
  seg = np.array([[1, 1, 2, 2, 2]])
  mask = masks.attention_mask(pos, pos, seg, seg)[0, 0]
  expected = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 1, 1, 1]], bool)
  np.testing.assert_array_equal(mask, expected)
