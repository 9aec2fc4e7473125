"""Absorption on a synthetic first-letter task with hand-built SAEs: one whose child latents
carry the parent (letter) direction and silence the parent latent scores absorption ≈ 1; a clean
one, whose parent latent always fires, ≈ 0."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.evaluation.bench.absorption import (
    AbsorptionConfig,
    absorption_scores,
    build_prompts,
    fit_letter_probes,
    main_latents,
    split_words,
    summarise_letters,
)
from saelab.saes.relu import ReLUSAE
from tiny_models import build_tiny_tokenizer

LETTERS = "abcd"
PER_LETTER = 40


def letter_task(seed: int = 0):
    """Activations ``x = 2·e_letter + e_word + noise`` over an orthonormal basis: 4 letter
    directions, then one direction per word."""
    n_words = len(LETTERS) * PER_LETTER
    d = len(LETTERS) + n_words
    letters = [c for c in LETTERS for _ in range(PER_LETTER)]
    x = torch.zeros(n_words, d)
    for w, c in enumerate(letters):
        x[w, LETTERS.index(c)] = 2.0
        x[w, len(LETTERS) + w] = 1.0
    x += 0.02 * torch.randn(n_words, d, generator=torch.Generator().manual_seed(seed))
    train, test = split_words(n_words, 0.3, seed)
    return x, letters, train, test


def hand_built_sae(letters, test, *, absorbing: bool) -> ReLUSAE:
    """Latents 0..3: a letter each (decoder 2·e_letter); then one per word (decoder e_word). The
    absorbing SAE gives each TEST word's latent the letter too (decoder 2·e_letter + e_word) and
    turns the letter latent off on those words, as absorption does."""
    n_l, n_w = len(LETTERS), len(letters)
    d = n_l + n_w
    sae = ReLUSAE(SAEConfig(hook="h", architecture="relu", width=d), d_in=d)
    W_enc, W_dec = torch.zeros(d, d), torch.zeros(d, d)
    for i in range(n_l):
        W_enc[i, i] = 0.5
        W_dec[i, i] = 2.0
    for w, c in enumerate(letters):
        j = n_l + w
        W_enc[j, j] = 1.0
        W_dec[j, j] = 1.0
        if absorbing and w in test:
            W_dec[j, LETTERS.index(c)] = 2.0
            W_enc[j, LETTERS.index(c)] = -3.0  # the word's direction silences its letter latent
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def scores(absorbing: bool):
    x, letters, train, test = letter_task()
    opts = AbsorptionConfig(words=len(letters), min_test_words=3)
    probes = fit_letter_probes(x, letters, train, test, opts)
    sae = hand_built_sae(letters, test, absorbing=absorbing)
    f = sae.encode(x).detach()
    per_letter = absorption_scores(
        x, f, letters, train, test, probes, sae.W_dec.detach(), sae.b_dec.detach(), opts
    )
    return probes, per_letter, main_latents(f, letters, train, test, probes, opts)


def test_an_absorbing_sae_scores_absorption_near_one():
    probes, per_letter, mains = scores(absorbing=True)
    assert probes.letters == list(LETTERS)  # every probe kept: the letter is linear in x
    assert all(float(f1) > 0.9 for f1 in probes.f1_L)
    assert mains == [[i] for i in range(len(LETTERS))]  # the letter latents, found from train
    summary = summarise_letters(per_letter)
    assert summary["absorption_letters"] == len(LETTERS)
    assert summary["absorption_rate"] == pytest.approx(1.0, abs=0.05)
    assert summary["absorption_fraction"] == pytest.approx(1.0, abs=0.05)
    assert all(v["true_positives"] >= 8 for v in per_letter.values())


def test_a_clean_sae_scores_absorption_near_zero():
    _, per_letter, mains = scores(absorbing=False)
    assert mains == [[i] for i in range(len(LETTERS))]
    summary = summarise_letters(per_letter)
    assert summary["absorption_rate"] == pytest.approx(0.0, abs=0.05)
    assert summary["absorption_fraction"] == pytest.approx(0.0, abs=0.05)


def test_prompts_put_the_word_token_where_it_is_read():
    tokenizer = build_tiny_tokenizer()
    words = {f"w{i}": i for i in range(3, 40)}
    chosen = sorted(words)[:12]
    opts = AbsorptionConfig(words=20, icl_examples=3, templates=("{word} is", "say{word}"))
    sequences, positions = build_prompts(tokenizer, words, chosen, opts)
    assert len(sequences) == len(chosen)
    for seq, pos, word in zip(sequences, positions, chosen, strict=True):
        assert seq[0] == tokenizer.bos_token_id and seq[pos] == words[word]
        assert seq.count(words[word]) == 1  # the word is never one of its own examples
    assert sequences[0] != sequences[1]


def test_bad_templates_are_refused():
    from saelab.errors import SaelabError

    with pytest.raises(SaelabError, match="exactly once"):
        AbsorptionConfig(templates=("no word here",))
