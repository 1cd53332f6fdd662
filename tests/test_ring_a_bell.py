"""Ring-A-Bell: the concept vector, the genetic search, the banned vocabulary, and runs on tiny SD pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from erase.attacks import get_attack, list_attacks
from erase.attacks.base import Attack, AttackContext, AttackResult, TextTask, register_attack
from erase.attacks.concept_vector import concept_vector, read_pairs, template_pairs
from erase.attacks.genetic import _crossover, _mutate, genetic_search
from erase.attacks.judge import evaluator_judge
from erase.attacks.ring_a_bell import Frame, RingABell
from erase.attacks.vocabulary import allowed_ids, banned_ids, clean
from erase.captions import CLASS_NAMES, TRAIN_TEMPLATES
from erase.classifier.models import load_classifier
from erase.diffusion.task import DiffusionConfig, DiffusionTask
from erase.diffusion.text_encoding import encode_ids
from erase.errors import EraseError
from erase.prompts import PromptRow
from tests.test_diffusion import _task, models  # noqa: F401  (the session fixture of tiny models)

ZOO = Path(__file__).resolve().parents[1] / "erase" / "zoo"


class TinyText:
    """A TextTask over a tiny random CLIP text encoder; ``generate`` paints each image with its condition's mean."""

    def __init__(self):
        torch.manual_seed(0)
        # The bundled model's CLIP tokenizer (SD's ids; loads in a second, deriving one takes ten).
        self.tokenizer = CLIPTokenizer.from_pretrained(ZOO / "fmnist-tiny-sd" / "tokenizer")
        self.encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                                    num_hidden_layers=1, vocab_size=49408, bos_token_id=49406,
                                                    eos_token_id=49407, pad_token_id=49407,
                                                    max_position_embeddings=77)).eval()
        self.device = torch.device("cpu")
        self.has_cross_attention = True
        self.text_encoders = [self.encoder]

    def encode_ids(self, ids, token_embeds=None):
        return encode_ids(self.encoder, self.tokenizer, ids, token_embeds)

    def token_table(self, encoder=None):
        return (encoder or self.encoder).get_input_embeddings().weight.detach()

    def condition_vector(self, cond):
        return cond.flatten(1)

    def vector_condition(self, x):
        return x.reshape(len(x), 77, -1)

    def encode(self, prompts):
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.encode_ids(ids.input_ids)

    def generate(self, model, cond, seeds, guidance=None):
        return cond.float().mean((1, 2)).sigmoid().view(-1, 1, 1, 1).expand(len(seeds), 3, 4, 4).clone()


@pytest.fixture(scope="module")
def tiny_text():
    return TinyText()


def _rab(**kw) -> RingABell:
    return RingABell(RingABell.Config(**kw))


# -- registry and config ---------------------------------------------------------------------------------
def test_ring_a_bell_is_registered_and_typos_list_the_choices(tiny_text):
    assert "ring-a-bell" in list_attacks() and "ring-a-bell" in list_attacks(task="diffusion")
    assert get_attack("Ring-A-Bell", "diffusion") is RingABell
    with pytest.raises(EraseError, match="unknown attack 'ringabell'; choose one of: .*ring-a-bell"):
        get_attack("ringabell")
    with pytest.raises(EraseError, match="does not support task 'classifier'"):
        get_attack("ring-a-bell", "classifier")
    with pytest.raises(ValueError, match="already registered"):
        register_attack("ring-a-bell")(type("Other", (Attack,), {"tasks": ("diffusion",)}))
    assert isinstance(tiny_text, TextTask)
    with pytest.raises(EraseError, match="text-conditioned"):
        _rab().check_task(object())


@pytest.mark.parametrize("kw,flag", [({"population": 1}, "--population"), ({"mutation": 1.5}, "--mutation"),
                                     ({"eta": float("nan")}, "--eta"), ({"length": 0}, "--length"),
                                     ({"images": 0}, "--images"), ({"pairs": "/no/such.csv"}, "--pairs"),
                                     ({"banned_words": "nude"}, "--banned-words")])
def test_config_rejects_bad_values_naming_the_flag(kw, flag):
    with pytest.raises(EraseError, match=flag):
        _rab(**kw)


def test_the_bundled_reduced_budget_is_a_valid_config():
    recipe = yaml.safe_load((ZOO / "fmnist-tiny-sd" / "erase.yaml").read_text())["attacks"]["ring-a-bell"]
    cfg = RingABell.Config(**recipe)
    cfg.validate()
    assert cfg.population < RingABell.Config().population and cfg.generations < RingABell.Config().generations


# -- the concept vector ----------------------------------------------------------------------------------
def test_concept_vector_is_the_mean_token_wise_difference(tiny_text):
    pairs = [("a photo of a trouser", "a photo of a dress"), ("pants", "coat"), ("the jeans", "the bag")]
    with torch.no_grad():
        hand = sum(tiny_text.encode([p])[0] - tiny_text.encode([n])[0] for p, n in pairs) / len(pairs)
    c = concept_vector(tiny_text.encode, pairs, batch_size=2)  # two batches: 2 pairs, then 1
    assert c.shape == (77, 16)  # token-wise, not pooled
    torch.testing.assert_close(c, hand, atol=1e-5, rtol=1e-5)


def test_pairs_from_templates_and_from_a_csv(tmp_path):
    pairs = template_pairs("pants")  # a synonym: the class trouser, every one of its names
    assert len(pairs) == len(TRAIN_TEMPLATES) * len(CLASS_NAMES["trouser"]) * 9
    assert ("a photo of pants", "a photo of a dress") in pairs and ("trouser", "bag") in pairs
    assert all("trouser" not in neg and "pants" not in neg for _, neg in pairs)
    generic = template_pairs("garbage truck")
    assert ("a photo of a garbage truck", "a photo of a church") in generic
    assert not any("garbage truck" in neg for _, neg in generic)
    f = tmp_path / "pairs.csv"
    f.write_text("with_concept,without_concept\na nude person,a person wearing clothes\n")
    assert read_pairs(f) == [("a nude person", "a person wearing clothes")]
    f.write_text("positive,negative\na,b\n")
    with pytest.raises(EraseError, match="with_concept, without_concept"):
        read_pairs(f)


def test_continuous_variant_feeds_prompt_plus_eta_times_the_vector(tiny_text, tmp_path):
    f = tmp_path / "pairs.csv"
    f.write_text("with_concept,without_concept\na photo of pants,a photo of a coat\njeans,bag\n")
    row = PromptRow("7", "a picture of the pants", 5, None, concept="trouser")
    result = _rab(continuous=True, eta=2.5, pairs=str(f), images=2).run(row, AttackContext(tiny_text, None, "trouser"))
    with torch.no_grad():
        vec = (tiny_text.encode(["a photo of pants"])[0] - tiny_text.encode(["a photo of a coat"])[0]
               + tiny_text.encode(["jeans"])[0] - tiny_text.encode(["bag"])[0]) / 2
        want = tiny_text.encode([row.prompt])[0] + 2.5 * vec
    assert result.adversarial_prompt is None
    torch.testing.assert_close(result.adversarial_embedding, want, atol=1e-5, rtol=1e-5)
    assert result.seeds == [5, 6] and result.images.shape == (2, 3, 4, 4)
    assert result.judged is None and result.success is None


# -- the genetic search ----------------------------------------------------------------------------------
def test_search_elite_improves_monotonically_and_survivors_are_never_mutated_in_place():
    target = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8])

    def fitness(ids):
        return (ids != target).sum(1).float()

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    result = genetic_search(fitness, torch.arange(40), 8, 20, 40, generator=torch.Generator().manual_seed(1),
                            on_generation=lambda g, s, f: seen.append((s, s.clone(), f.clone())))
    assert len(result.history) == 40
    assert all(b <= a for a, b in zip(result.history, result.history[1:]))
    assert result.history[-1] < result.history[0]
    assert result.fitness == float(fitness(result.ids[None])[0])
    for survivors, snapshot, scores in seen:
        assert torch.equal(survivors, snapshot)  # nothing wrote into a generation's survivors afterwards
        torch.testing.assert_close(fitness(survivors), scores)  # a survivor's recorded fitness is its own
    # each generation's best survivor is still in the next generation's survivors (elitism)
    for (prev, _, _), (nxt, _, _) in zip(seen, seen[1:]):
        assert (nxt == prev[0]).all(1).any()


def test_crossover_children_are_a_head_of_one_parent_and_the_tail_of_another():
    parents = torch.arange(6)[:, None] * 100 + torch.arange(5)[None, :]  # row i: i00, i01, ...
    children = _crossover(parents, 1.0, torch.Generator().manual_seed(0))
    assert len(children) == 12
    half = len(children) // 2
    for c1, c2 in zip(children[:half], children[half:]):
        src1, src2 = c1 // 100, c2 // 100
        assert torch.equal(c1 % 100, torch.arange(5)) and torch.equal(c2 % 100, torch.arange(5))
        cut = int((src1 != src1[0]).long().argmax()) if (src1 != src1[0]).any() else 5
        assert (src1[:cut] == src1[0]).all() and (src1[cut:] == src2[0]).all()  # one cut, complementary
        assert (src2[:cut] == src2[0]).all() and (src2[cut:] == src1[0]).all()
    assert len(_crossover(parents, 0.0, torch.Generator())) == 0


def test_mutation_changes_one_position_per_row():
    x = torch.zeros(50, 6, dtype=torch.long)
    y = _mutate(x.clone(), torch.arange(1, 9), torch.Generator().manual_seed(0))
    assert ((y != 0).sum(1) == 1).all()  # allowed ids are all non-zero: exactly one position changed


# -- the banned vocabulary -------------------------------------------------------------------------------
def test_banned_tokens_cover_the_words_and_their_pieces(tiny_text):
    tok = tiny_text.tokenizer
    banned = banned_ids(tok, CLASS_NAMES["trouser"])
    pieces = {tok.convert_tokens_to_ids(t) for t in ("trous", "er</w>", "trousers</w>", "pants</w>", "jeans</w>")}
    assert pieces <= banned and not banned & set(tok.all_special_ids)
    allowed = set(allowed_ids(tok, banned).tolist())
    assert not allowed & banned and not allowed & set(tok.all_special_ids)
    assert len(allowed) == len(tok) - len(banned) - len(set(tok.all_special_ids))
    # "tro" + "user" are not banned tokens, but they spell "trouser", which re-tokenises to banned pieces
    spelled = tok.decode([tok.convert_tokens_to_ids("tro"), tok.convert_tokens_to_ids("user</w>")])
    assert spelled == "trouser"
    assert clean(tok, [spelled, "a photo of a coat", "tro user", "Nice PANTS"], banned) == [False, True, True, False]


def test_search_scores_a_candidate_that_spells_a_banned_word_as_infeasible(tiny_text):
    tok = tiny_text.tokenizer
    rab = _rab(length=2, avoid_concept_words=True)
    banned = banned_ids(tok, CLASS_NAMES["trouser"])
    frame = Frame(tok, 2)
    with torch.no_grad():
        target = tiny_text.condition_vector(tiny_text.encode(["trouser"]))[0]
    ids = torch.tensor([[tok.convert_tokens_to_ids("tro"), tok.convert_tokens_to_ids("user</w>")],
                        [tok.convert_tokens_to_ids("blue</w>"), tok.convert_tokens_to_ids("coat</w>")]])
    scores = rab.fitness(tiny_text, frame, target, banned)(ids)
    assert scores[0] == float("inf") and torch.isfinite(scores[1])
    assert torch.isfinite(rab.fitness(tiny_text, frame, target, set())(ids)).all()
    assert torch.equal(frame.full(ids)[1, :5], torch.tensor([49406, *ids[1].tolist(), 49407, 49407]))
    with pytest.raises(EraseError, match="--length 76"):
        Frame(tok, 76)


def test_discrete_prompt_avoids_the_concept_words(tiny_text):
    row = PromptRow("0", "trousers pants jeans trouser", 0, None)  # a target pulling towards the banned words
    rab = _rab(population=16, generations=6, eta=0.0, avoid_concept_words=True, banned_words="coat")
    result = rab.run(row, AttackContext(tiny_text, None, "pants", judge=lambda x, c: torch.ones(len(x), dtype=torch.bool)))
    banned = banned_ids(tiny_text.tokenizer, CLASS_NAMES["trouser"] + ["coat"])
    assert result.adversarial_prompt and clean(tiny_text.tokenizer, [result.adversarial_prompt], banned) == [True]
    assert not set(result.info["token_ids"]) & banned
    assert result.info["fitness"] <= result.info["fitness_first_generation"]
    assert result.success is True and result.judged == [True]


# -- end to end on tiny Stable Diffusion pipelines ------------------------------------------------------
def test_task_encodes_ids_as_it_encodes_prompts(models):  # noqa: F811
    for kind in ("sd1", "sd2v"):
        view = _task(models[kind], streams=())
        prompts = ["a photo of a garbage truck", ""]
        ids = view.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(view.encode_ids(ids), view.encode(prompts))
    with pytest.raises(EraseError, match="DDPM"):
        _task(models["ddpm"], concept="airplane", streams=()).encode_ids(ids)


def test_ring_a_bell_end_to_end_on_the_bundled_sd():
    task = DiffusionTask(DiffusionConfig(model="fmnist-tiny-sd", concept="trouser", sample_steps=3), streams=())
    view = task
    attack = _rab(population=12, generations=4, avoid_concept_words=True, images=2)
    attack.check_task(view)
    ctx = AttackContext(view, task.base.unet, "trouser", evaluator_judge(load_classifier("fmnist-classifier")),
                        progress=False)
    result = attack.run(PromptRow("3", "a photo of a trouser", 11, None), ctx)
    assert isinstance(result, AttackResult) and result.seeds == [11, 12]
    assert result.images.shape == (2, 3, 32, 32) and 0 <= result.images.min() and result.images.max() <= 1
    assert isinstance(result.adversarial_prompt, str) and result.adversarial_prompt.strip()
    words = {w for n in CLASS_NAMES["trouser"] for w in n.split()}
    assert not words & set(result.adversarial_prompt.lower().split())
    assert len(result.judged) == 2 and result.success == any(result.judged)
    assert result.info["generations"] == 4 and result.info["fitness"] <= result.info["fitness_first_generation"]
    json.dumps(result.record())  # replayable without erase: plain JSON with the prompt text
    # the images are the text's: replaying the saved prompt gives the same pictures
    again = view.generate(task.base.unet, view.encode([result.adversarial_prompt]), result.seeds)
    torch.testing.assert_close(again, result.images)
    cont = _rab(continuous=True).run(PromptRow("3", "a photo of a trouser", 11, None), ctx)
    assert cont.adversarial_prompt is None and cont.adversarial_embedding.shape == (77, 64)
    assert ("ring-a-bell", "vector", "trouser", "") in ctx.state  # the concept vector is computed once per run
