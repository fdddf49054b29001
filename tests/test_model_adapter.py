"""The MSE-Adapter on its own: parameter budget, shapes, masks, config validation."""

from __future__ import annotations

import pytest
import torch

from tracker.config import ConfigError, load_dataclass
from tracker.model.adapter import AdapterConfig, ModalityBatch, ModalityConfig, MSEAdapter, collate_modalities


def paper_config(H: int = 4096) -> AdapterConfig:
    """The paper's setting: acoustic and visual sequence encoders, d = 256, scalar expansion, no text modality."""
    return AdapterConfig(
        llm_hidden_size=H,
        d_model=256,
        modalities=[ModalityConfig("audio", 25, lstm_hidden=64), ModalityConfig("visual", 35, lstm_hidden=64)],
        text_as_modality=False,
        n_pseudo_tokens=4,
        expansion="scalar",
    )


def test_paper_setting_has_about_2_6m_trainable_parameters_at_4096():
    adapter = MSEAdapter(paper_config(4096))
    n = adapter.num_trainable_parameters()
    assert 2_400_000 <= n <= 3_000_000, n


def test_fusion_mlps_use_h_over_8_16_32():
    adapter = MSEAdapter(paper_config(4096))
    widths = [branch[0].out_features for branch in adapter.fusion.branches]
    assert widths == [512, 256, 128]
    assert isinstance(adapter.fusion.merge, torch.nn.Conv1d) and adapter.fusion.merge.kernel_size == (1,)


@pytest.mark.parametrize("expansion", ["scalar", "per_token"])
def test_mixed_present_and_missing_modalities_give_right_shapes_and_masks(expansion):
    torch.manual_seed(0)
    H = 64
    cfg = AdapterConfig(llm_hidden_size=H, d_model=32, modalities=[ModalityConfig("audio", 25), ModalityConfig("visual", 7)],
                        n_pseudo_tokens=5, expansion=expansion)
    adapter = MSEAdapter(cfg).eval()
    B, U = 4, 6
    text = torch.randn(B, U, H)
    text_mask = torch.ones(B, U, dtype=torch.long)
    text_mask[1, 3:] = 0
    items = [
        {"audio": torch.randn(30, 25).numpy(), "visual": torch.randn(10, 7).numpy()},
        {"audio": torch.randn(12, 25).numpy()},
        {"visual": torch.randn(5, 7).numpy()},
        {},
    ]
    mods = collate_modalities(items, ["audio", "visual"])
    assert mods["audio"].features.shape == (4, 30, 25)
    assert mods["audio"].lengths.tolist() == [30, 12, 0, 0]
    assert mods["visual"].lengths.tolist() == [10, 0, 5, 0]
    pseudo, present = adapter(text, text_mask, mods)
    assert pseudo.shape == (B, 5, H)
    # columns: text (its own modality), audio, visual
    assert present.tolist() == [[True, True, True], [True, True, False], [True, False, True], [True, False, False]]
    assert torch.isfinite(pseudo).all()


def test_missing_modality_is_masked_not_zero_features():
    """A row without audio must equal the same row run with no audio tensor at all (masking, not zeros)."""
    torch.manual_seed(0)
    cfg = AdapterConfig(llm_hidden_size=64, d_model=32, n_pseudo_tokens=3)
    adapter = MSEAdapter(cfg).eval()
    text = torch.randn(2, 5, 64)
    mask = torch.ones(2, 5, dtype=torch.long)
    with_audio = collate_modalities([{"audio": torch.randn(9, 25).numpy()}, {}], ["audio"])
    out_mixed, _ = adapter(text, mask, with_audio)
    out_none, _ = adapter(text[1:], mask[1:], {})
    torch.testing.assert_close(out_mixed[1:], out_none)
    # and a zero-valued "feature" sequence is NOT the same as missing
    zeros = {"audio": ModalityBatch(torch.zeros(1, 9, 25), torch.tensor([9]))}
    out_zero, _ = adapter(text[1:], mask[1:], zeros)
    assert not torch.allclose(out_zero, out_none)


def test_text_only_pseudo_tokens_depend_on_the_utterance_only_with_text_modality():
    torch.manual_seed(0)
    text = torch.randn(2, 5, 64)
    mask = torch.ones(2, 5, dtype=torch.long)
    for text_as_modality, differ in ((True, True), (False, False)):
        adapter = MSEAdapter(AdapterConfig(llm_hidden_size=64, d_model=32, text_as_modality=text_as_modality)).eval()
        pseudo, _ = adapter(text, mask, {})
        assert (not torch.allclose(pseudo[0], pseudo[1])) == differ


def test_scalar_expansion_tokens_are_collinear_per_token_are_not():
    torch.manual_seed(0)
    text = torch.randn(1, 5, 64)
    mask = torch.ones(1, 5, dtype=torch.long)
    for expansion, collinear in (("scalar", True), ("per_token", False)):
        adapter = MSEAdapter(AdapterConfig(llm_hidden_size=64, d_model=32, n_pseudo_tokens=4, expansion=expansion)).eval()
        with torch.no_grad():
            pseudo, _ = adapter(text, mask, {})
            # remove the per-token bias of the scalar expansion and compare directions
            if expansion == "scalar":
                pseudo = pseudo - adapter.projector.expand.bias.view(1, -1, 1)
        cos = torch.nn.functional.cosine_similarity(pseudo[0, 0], pseudo[0, 1], dim=0).abs()
        assert (cos > 0.9999) == collinear, (expansion, cos)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_pseudo_tokens"):
        load_dataclass(AdapterConfig, {"llm_hidden_size": 64, "n_pseudo_tokens": "eight"})
    with pytest.raises(ConfigError, match="expansion"):
        AdapterConfig(llm_hidden_size=64, expansion="linear")
    with pytest.raises(ConfigError, match="modalities\\[0\\].feature_dim"):
        load_dataclass(AdapterConfig, {"modalities": [{"name": "audio", "feature_dim": "x"}]})
    with pytest.raises(ConfigError, match="bogus"):
        load_dataclass(AdapterConfig, {"bogus": 1})


def test_normalized_pseudo_tokens_take_the_llms_embedding_norm(tiny_backbone):
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig
    from tracker.model.inputs import UtteranceInput

    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", adapter=AdapterConfig(normalize_pseudo_tokens=True)))
    target = tiny_backbone.embed(torch.arange(0, len(tiny_backbone.tokenizer), 7)).norm(dim=-1).mean()
    assert float(rec.adapter.pseudo_token_norm) == pytest.approx(float(target), rel=1e-5)
    batch = rec.collate([UtteranceInput("hello there", "A"), UtteranceInput("what?", "B")])
    with torch.no_grad():
        pseudo, _ = rec.pseudo_tokens(batch)
    torch.testing.assert_close(pseudo.norm(dim=-1), torch.full(pseudo.shape[:2], float(target)), rtol=1e-4, atol=1e-4)
    assert "pseudo_gain" in dict(rec.adapter.named_parameters())


def test_modality_layer_norm_keeps_a_small_modality_audible():
    """With per-modality LayerNorm, scaling the text encoder's output up leaves the audio's share intact."""
    torch.manual_seed(0)
    cfg = AdapterConfig(llm_hidden_size=64, d_model=32, modality_layer_norm=True, dropout=0.0)
    adapter = MSEAdapter(cfg).eval()
    text, mask = torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.long)
    audio = collate_modalities([{"audio": torch.randn(20, 25).numpy()}, {"audio": torch.randn(20, 25).numpy() * 3}], ["audio"])
    with torch.no_grad():
        before, _ = adapter(text, mask, audio)
        adapter.text_encoder.out.weight.mul_(100.0)
        adapter.text_encoder.out.bias.mul_(100.0)
        after, _ = adapter(text, mask, audio)
    torch.testing.assert_close(before, after, rtol=1e-3, atol=1e-3)


def test_frame_pooling_averages_real_frames_only():
    from tracker.model.adapter import pool_frames

    feats = torch.arange(2 * 7 * 1, dtype=torch.float32).view(2, 7, 1)
    pooled, lengths = pool_frames(feats, torch.tensor([7, 4]), 3)
    assert lengths.tolist() == [3, 2]
    assert pooled[0, :, 0].tolist() == [1.0, 4.0, 6.0]  # (0+1+2)/3, (3+4+5)/3, 6/1
    assert pooled[1, :2, 0].tolist() == [8.0, 10.0]  # (7+8+9)/3, 10/1 (frames 11-13 are padding)
    adapter = MSEAdapter(AdapterConfig(llm_hidden_size=64, d_model=32, modalities=[ModalityConfig("audio", 25, frame_pooling=10)])).eval()
    out, _ = adapter(torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.long),
                     collate_modalities([{"audio": torch.randn(95, 25).numpy()}], ["audio"]))
    assert out.shape == (1, 8, 64)
