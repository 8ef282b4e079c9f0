"""The encoder-decoder layout of a batch (T5; BLIP-2 §3.3's prefix LM): what goes to the encoder,
what the decoder must write, and that no decoder target is ever empty."""

import numpy as np
import pytest

from jaxvlm.data import pipeline, transforms
from jaxvlm.data.world_config import TRAINING_SPLITS

PAD, START, BOS, EOS, IMAGE = 0, 0, 2, 3, 4
T, TD = 16, 12


def _example(prefix, target, eos=True):
    """A right-padded decoder-only example: `prefix` (loss 0) then `target` (+ EOS, loss 1)."""
    ids = [*prefix, *target, *([EOS] if eos else [])]
    tokens = np.full(T, PAD, np.int32)
    tokens[: len(ids)] = ids
    mask = (np.arange(T) < len(ids)).astype(np.int32)
    loss_mask = np.zeros(T, np.int32)
    loss_mask[len(prefix) : len(ids)] = 1
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "images": np.ones((1, 2))}


def _split(mode, decoder_max_len=TD):
    return transforms.SplitForEncoderDecoder(
        mode, decoder_max_len=decoder_max_len, decoder_start_id=START, eos_id=EOS, pad_id=PAD
    )


def _parts(out):
    encoder = out["tokens"][out["mask"] == 1].tolist()
    decoder = out["decoder_tokens"][out["decoder_mask"] == 1].tolist()
    return encoder, decoder


def test_random_split_moves_one_to_half_of_the_caption_into_the_encoder():
    prefix, caption = [BOS, IMAGE, IMAGE], [10, 11, 12, 13, 14, 15, 16]  # n = 7: s in 1..3
    split, seen = _split("random"), set()
    for seed in range(200):
        out = split.random_map(_example(prefix, caption), np.random.default_rng(seed))
        encoder, decoder = _parts(out)
        s = len(encoder) - len(prefix)
        seen.add(s)
        assert encoder == prefix + caption[:s]
        assert decoder == [START, *caption[s:], EOS]
        # The loss covers what the decoder writes (the suffix and EOS), never its start token.
        assert out["loss_mask"].tolist() == [0] + [1] * (len(decoder) - 1) + [0] * (
            TD - len(decoder)
        )
        assert out["unsplit"] == 0
        np.testing.assert_array_equal(out["images"], np.ones((1, 2)))  # other keys pass through
    assert seen == {1, 2, 3}


@pytest.mark.parametrize("mode", ["random", "half"])
@pytest.mark.parametrize("length", [0, 1])
def test_a_caption_too_short_to_split_goes_wholly_to_the_decoder(mode, length):
    caption = list(range(10, 10 + length))
    out = _split(mode).random_map(_example([BOS, IMAGE], caption), np.random.default_rng(0))
    encoder, decoder = _parts(out)
    assert encoder == [BOS, IMAGE]
    assert decoder == [START, *caption, EOS]
    assert out["loss_mask"].sum() == length + 1  # never empty: at least the EOS
    assert out["unsplit"] == 1


def test_no_decoder_target_is_ever_empty():
    split, rng = _split("random"), np.random.default_rng(0)
    for length in range(0, 10):
        for eos in (True, False):
            if not length and not eos:
                continue
            out = split.random_map(_example([BOS], list(range(10, 10 + length)), eos), rng)
            assert out["loss_mask"].sum() >= 1, (length, eos)


def test_half_and_none_are_deterministic():
    prefix, caption = [BOS], [10, 11, 12, 13, 14]
    half = _split("half").random_map(_example(prefix, caption), None)
    assert _parts(half) == ([BOS, 10, 11], [START, 12, 13, 14, EOS])
    none = _split("none").random_map(_example(prefix, caption), None)
    assert _parts(none) == ([BOS], [START, *caption, EOS])
    assert none["unsplit"] == 0  # nothing was meant to be split


def test_a_long_target_is_cut_at_the_decoder_length():
    out = _split("none", decoder_max_len=4).random_map(_example([BOS], [10, 11, 12, 13]), None)
    assert _parts(out) == ([BOS], [START, 10, 11, 12])
    assert out["decoder_tokens"].shape == (4,)


def test_multi_turn_keeps_later_user_turns_as_decoder_context():
    """Everything from the first target on is the decoder's; its loss flags are kept."""
    ids = [BOS, 20, 21, 30, EOS, 22, 31, EOS]
    loss = [0, 0, 0, 1, 1, 0, 1, 1]
    example = {
        "tokens": np.pad(np.array(ids, np.int32), (0, T - len(ids))),
        "mask": np.pad(np.ones(len(ids), np.int32), (0, T - len(ids))),
        "loss_mask": np.pad(np.array(loss, np.int32), (0, T - len(ids))),
    }
    out = _split("none").random_map(example, None)
    assert _parts(out) == ([BOS, 20, 21], [START, 30, EOS, 22, 31, EOS])
    assert out["loss_mask"][:6].tolist() == [0, 1, 1, 0, 1, 1]


def test_bad_settings_name_the_config_key():
    with pytest.raises(ValueError, match="config.data.prefix_split='prefix'"):
        _split("prefix")
    with pytest.raises(ValueError, match="config.data.decoder_max_len=1"):
        _split("none", decoder_max_len=1)


def test_text_batches_for_an_encoder_decoder(small_world, tokenizer):
    split = transforms.SplitForEncoderDecoder(
        "random", decoder_max_len=20, decoder_start_id=0, eos_id=tokenizer.eos_id, pad_id=0
    )

    def first_batch():
        iterator = pipeline.make_train_iterator(
            "text",
            small_world,
            tokenizer,
            None,
            split=TRAINING_SPLITS,
            global_batch_size=8,
            max_text_len=24,
            seed=0,
            encoder_decoder=split,
        )
        batch = next(iterator)
        iterator.close()
        return batch

    batch = first_batch()
    assert sorted(batch) == sorted(transforms.ENCODER_DECODER_KEYS)
    assert batch["tokens"].shape == batch["mask"].shape == (8, 24)
    for key in ("decoder_tokens", "decoder_mask", "loss_mask"):
        assert batch[key].shape == (8, 20) and batch[key].dtype == np.int32
    assert np.all(batch["tokens"][:, 0] == tokenizer.bos_id)
    assert np.all(batch["decoder_tokens"][:, 0] == 0) and np.all(batch["loss_mask"][:, 0] == 0)
    assert np.all(batch["loss_mask"].sum(axis=1) >= 1)
    for key, value in first_batch().items():  # a function of (seed, stream index) only
        np.testing.assert_array_equal(value, batch[key])
    with pytest.raises(ValueError, match="captions task has no targets"):
        pipeline.make_train_iterator(
            "captions",
            small_world,
            tokenizer,
            pipeline.ImagePreprocessing(image_size=64),
            split="train",
            global_batch_size=8,
            max_text_len=24,
            seed=0,
            encoder_decoder=split,
        )


def test_an_encoder_decoder_scores_the_second_half_and_trims_both_stacks(tiny_config, small_world):
    """The T5 backbone's perplexity: each text split in half ("half"), encoder and decoder rows
    trimmed separately, the same NLL sums as untrimmed."""
    import flax.linen as nn
    import jax

    from jaxvlm import data, models, sharding
    from jaxvlm.data.tokenizer import world_tokenizer
    from jaxvlm.evals.perplexity import trim_padding
    from jaxvlm.predict import predict_fns

    config = tiny_config("backbones_pretrain", model="t5")
    tokenizer = world_tokenizer()
    model = models.build_model(config)
    params = nn.unbox(models.init_fn(model, config)(jax.random.key(0)))
    score = predict_fns(model, sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))["score"]
    split = models.encoder_decoder_split(config, tokenizer, mode="half")
    texts = data.eval_texts(small_world, "validation", tokenizer, max_text_len=96)
    examples = [split.random_map(texts[i], None) for i in range(8)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    for row in range(8):  # the encoder holds bos and the first half of the text
        text_length = int(texts[row]["mask"].sum()) - 2  # without bos and eos
        assert batch["mask"][row].sum() == 1 + text_length // 2
    trimmed = trim_padding(batch, bucket=8)
    assert trimmed["decoder_tokens"].shape[1] < batch["decoder_tokens"].shape[1]
    np.testing.assert_allclose(
        np.asarray(score(params, trimmed)),
        np.asarray(score(params, {k: v for k, v in batch.items() if v.ndim == 2})),
        rtol=1e-5,
        atol=1e-5,
    )
