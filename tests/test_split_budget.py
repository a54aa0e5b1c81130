"""The per-image budget split (largest remainder, earlier image first on equal remainders) against the
independent oracle in exact fractions, including exact ties that float arithmetic breaks."""
import random

from reference.pre_llm_oracle import split

from vlm_tokenprune.methods.baselines import split_budget


def test_exact_tie_goes_to_the_earlier_image():
    # 20 * [40, 16, 30, 34] / 120: remainders 2/3, 2/3, 0, 2/3 -> seats to images 0 and 1 (floats gave image 3)
    assert split_budget(20, [40, 16, 30, 34]) == split(20, [40, 16, 30, 34]) == [7, 3, 5, 5]


def test_random_splits_equal_the_oracle():
    rng = random.Random(0)
    for _ in range(3000):
        sizes = [rng.choice([1, 4, 9, 16, 30, 34, 40, 64, 144, 576]) for _ in range(rng.randint(1, 5))]
        k = rng.randint(len(sizes), sum(sizes))
        got = split_budget(k, sizes)
        assert sum(got) == k and all(0 <= g <= s for g, s in zip(got, sizes))
        if min(got) >= 1:  # the oracle also floors each image at one token
            assert got == split(k, sizes), (k, sizes)
