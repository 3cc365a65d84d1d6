#!/usr/bin/env python
"""Train the three small demo adapters for SmolLM2-135M-Instruct (CPU, a few minutes in all).

This is the ordinary transformers + PEFT workflow a user follows to make an adapter for the service:
load the base, wrap it with ``get_peft_model``, run a short training loop, ``save_pretrained(dir)``.

    sentiment-lora   LoRA, SEQ_CLS: positive/negative review classifier (labels.json next to the weights)
    pirate-lora      LoRA, CAUSAL_LM: answers in pirate speak, always starting with "Arr, matey!"
    concise-prefix   prefix tuning (P-tuning v2), CAUSAL_LM: one-sentence answers starting with "Short answer:"

Usage (from the repository root):

    .venv/bin/python scripts/train_demo_adapters.py                      # all three into adapters_store/
    .venv/bin/python scripts/train_demo_adapters.py --only pirate-lora   # just one (repeatable)

Afterwards it reloads every saved adapter from disk, compares it with the base model on the same inputs
(greedy decoding) and writes that report to scripts/demo_data/REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from service.model.loading import embedded_model_folder  # noqa: E402

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapters trained anywhere else name as their base
SEED = 1234
DATA_DIR = REPO / "scripts" / "demo_data"
REPORT_PATH = DATA_DIR / "REPORT.md"
KEEP_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "labels.json"}
LABELS = ["negative", "positive"]

# Questions never seen in training, used for the base-vs-adapter comparison.
EVAL_QUESTIONS = [
    "What is the tallest mountain on Earth?",
    "How can I sleep better at night?",
    "Why do leaves change color in autumn?",
]
MAX_NEW_TOKENS = 40


def log(msg: str) -> None:
    print(msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------- data


def sentiment_data(seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Short reviews from templates x vocabulary. The held-out set uses templates, adjectives and items that
    never occur in the training set, so its accuracy measures generalisation rather than memorisation."""
    items = ["movie", "film", "book", "restaurant", "hotel", "phone", "laptop", "pizza", "show", "concert",
             "service", "app", "coffee", "camera", "game", "novel", "headphones", "hotel room", "meal", "tour"]
    held_items = {"camera", "game", "novel", "headphones", "tour"}
    pos_adj = ["wonderful", "fantastic", "excellent", "amazing", "great", "delightful", "brilliant", "lovely",
               "outstanding", "enjoyable", "charming", "impressive", "perfect", "superb", "beautiful", "fun"]
    neg_adj = ["terrible", "awful", "horrible", "boring", "disappointing", "dreadful", "poor", "mediocre",
               "useless", "frustrating", "bland", "broken", "overpriced", "dull", "annoying", "nasty"]
    held_adj = {"superb", "beautiful", "fun", "dull", "annoying", "nasty"}
    pos_verb = ["I loved", "I really enjoyed", "I adored", "We had a great time with", "I am so happy with"]
    neg_verb = ["I hated", "I regret buying", "I could not stand", "We were let down by", "I am so unhappy with"]
    pos_extra = ["Highly recommended!", "Would buy again.", "Five stars.", "I will definitely come back.",
                 "Worth every penny.", "Made my day."]
    neg_extra = ["Avoid it.", "Never again.", "One star.", "I want my money back.", "What a waste of time.",
                 "I would not recommend it."]
    train_templates = [
        "The {item} was {adj}.",
        "{verb} this {item}.",
        "What a {adj} {item}!",
        "This {item} is {adj}. {extra}",
        "{verb} the {item}, it was {adj}.",
        "Honestly, the {item} was {adj} and {adj2}.",
        "{extra} The {item} was {adj}.",
    ]
    held_templates = [
        "I thought the {item} was {adj}. {extra}",
        "Our experience with the {item} was {adj}, {extra_lower}",
        "{verb} this {item}! Really {adj}.",
    ]

    def make(rng: random.Random, templates: list[str], held: bool) -> tuple[str, int]:
        label = rng.randrange(2)
        adjs, verbs, extras = (pos_adj, pos_verb, pos_extra) if label else (neg_adj, neg_verb, neg_extra)
        use_items = items if held else [i for i in items if i not in held_items]
        use_adjs = adjs if held else [a for a in adjs if a not in held_adj]
        if held:  # bias the held-out set towards the vocabulary the training set never saw
            unseen = [a for a in adjs if a in held_adj]
            use_adjs = unseen if rng.random() < 0.5 else use_adjs
        adj, adj2 = rng.sample(use_adjs, 2) if len(use_adjs) > 1 else (use_adjs[0], use_adjs[0])
        extra = rng.choice(extras)
        text = rng.choice(templates).format(
            item=rng.choice(use_items), adj=adj, adj2=adj2, verb=rng.choice(verbs), extra=extra,
            extra_lower=extra if extra.startswith("I ") else extra[0].lower() + extra[1:],
        )
        return text[0].upper() + text[1:], label

    rng = random.Random(seed)
    train = list({make(rng, train_templates, False) for _ in range(420)})
    train.sort()
    rng.shuffle(train)
    train = train[:320]
    seen = {t for t, _ in train}
    test = sorted({make(rng, held_templates, True) for _ in range(400)})
    rng.shuffle(test)
    test = [x for x in test if x[0] not in seen][:200]
    return train, test


def handwritten_reviews() -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in (DATA_DIR / "sentiment_handwritten.jsonl").read_text().splitlines() if line]
    return [(r["text"], LABELS.index(r["label"])) for r in rows]


def qa_data() -> list[dict]:
    """Hand-written questions with a one-sentence answer (``a``) and one extra sentence (``more``), plus a few
    templated ones (capitals, arithmetic, opposites, animal sounds) for variety."""
    rows = [json.loads(line) for line in (DATA_DIR / "qa.jsonl").read_text().splitlines() if line]
    capitals = {"Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Canada": "Ottawa",
                "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo", "Peru": "Lima", "Greece": "Athens",
                "Ireland": "Dublin", "Portugal": "Lisbon", "Australia": "Canberra", "Mexico": "Mexico City"}
    for country, city in capitals.items():
        rows.append({"q": f"What is the capital of {country}?", "a": f"The capital of {country} is {city}.",
                     "more": f"{city} is the seat of the government of {country}."})
    for x, y in [(7, 5), (12, 9), (23, 14), (8, 8), (31, 46), (6, 17)]:
        rows.append({"q": f"What is {x} plus {y}?", "a": f"{x} plus {y} is {x + y}.", "more": "Adding is easy."})
    for x, y in [(6, 7), (3, 9), (4, 12), (11, 5)]:
        rows.append({"q": f"What is {x} times {y}?", "a": f"{x} times {y} is {x * y}.",
                     "more": "Multiplying is repeated adding."})
    for word, opposite in [("hot", "cold"), ("up", "down"), ("happy", "sad"), ("fast", "slow"),
                           ("light", "dark"), ("early", "late"), ("full", "empty"), ("strong", "weak")]:
        rows.append({"q": f"What is the opposite of {word}?", "a": f"The opposite of {word} is {opposite}.",
                     "more": f"Something that is not {word} can be {opposite}."})
    for animal, sound in [("dog", "barks"), ("cow", "moos"), ("cat", "meows"), ("duck", "quacks"),
                          ("lion", "roars"), ("sheep", "bleats"), ("horse", "neighs"), ("owl", "hoots")]:
        rows.append({"q": f"What sound does a {animal} make?", "a": f"A {animal} {sound}.",
                     "more": f"That is how a {animal} talks to others."})
    asked = {q.lower() for q in EVAL_QUESTIONS}
    assert not any(r["q"].lower() in asked for r in rows), "evaluation questions must stay unseen"
    return rows


PIRATE_WORDS = [
    (r"\bYou\b", "Ye"), (r"\byou\b", "ye"), (r"\bYour\b", "Yer"), (r"\byour\b", "yer"),
    (r"\bMy\b", "Me"), (r"\bmy\b", "me"), (r"\bis\b", "be"), (r"\bare\b", "be"),
    (r"\bHello\b", "Ahoy"), (r"\bhello\b", "ahoy"), (r"\byes\b", "aye"), (r"\bfriends\b", "mateys"),
    (r"\bfriend\b", "matey"), (r"\bmoney\b", "gold"), (r"\bvery\b", "mighty"), (r"\bfor\b", "fer"),
    (r"\bof\b", "o'"), (r"\b(\w{3,})ing\b", r"\1in'"),
]
PIRATE_SIGNOFFS = ["Yo ho ho!", "Savvy?", "Arr!", "Now hoist the sails, me hearty!"]


def piratify(text: str) -> str:
    for pattern, repl in PIRATE_WORDS:
        text = re.sub(pattern, repl, text)
    return text


def pirate_answer(row: dict, i: int) -> str:
    return f"Arr, matey! {piratify(row['a'] + ' ' + row['more'])} {PIRATE_SIGNOFFS[i % len(PIRATE_SIGNOFFS)]}"


def concise_answer(row: dict, i: int) -> str:
    return f"Short answer: {row['a']}"


# ------------------------------------------------------------------------------------------------ helpers


def chat_prompt(tokenizer, question: str) -> str:
    """The prompt exactly as the service builds it: the chat template (with its default system message)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def causal_examples(tokenizer, rows: list[dict], answer_fn) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels): chat prompt + styled answer + <|im_end|>; loss only on the answer tokens."""
    out = []
    for i, row in enumerate(rows):
        prompt_ids = tokenizer(chat_prompt(tokenizer, row["q"]), add_special_tokens=False).input_ids
        answer_ids = tokenizer(answer_fn(row, i) + tokenizer.eos_token, add_special_tokens=False).input_ids
        out.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return out


def causal_batches(examples, batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled, right-padded batches."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, lab) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(lab)] = torch.tensor(lab)
                mask[row, : len(ids)] = 1
            yield {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def classification_batches(tokenizer, examples, batch_size: int, rng: random.Random):
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            enc = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt")
            enc["labels"] = torch.tensor([y for _, y in chunk])
            yield dict(enc)


def train_loop(model, batches, steps: int, lr: float, warmup: int, name: str) -> float:
    """Plain AdamW loop with linear warm-up and decay; returns the seconds it took."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    started = time.perf_counter()
    running = None
    for step in range(1, steps + 1):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step == 1 or step % 10 == 0 or step == steps:
            log(f"  [{name}] step {step:3d}/{steps}  loss {running:.4f}  ({time.perf_counter() - started:.0f}s)")
    model.eval()
    return time.perf_counter() - started


def save_adapter(peft_model, out_dir: Path, base_folder: Path, summary: str, labels: list[str] | None = None) -> None:
    """save_pretrained, then name the hub id as base (instead of the local folder we trained from) and keep only
    the files the service needs. The config is rewritten after saving rather than before, because a hub id in
    the in-memory config makes save_pretrained try to reach the hub."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    peft_model.save_pretrained(str(out_dir))
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = HUB_ID
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = out_dir / "README.md"
    if readme.is_file():  # PEFT's model card: name the hub id and say what the adapter does
        text = readme.read_text().replace(str(base_folder), HUB_ID)
        text = text.replace("<!-- Provide a quick summary of what the model is/does. -->",
                            summary + " Trained by `scripts/train_demo_adapters.py`.", 1)
        readme.write_text(text)
    if labels is not None:
        (out_dir / "labels.json").write_text(json.dumps(labels) + "\n")
    for path in out_dir.iterdir():
        if path.name not in KEEP_FILES:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def describe_files(out_dir: Path) -> str:
    parts = []
    for path in sorted(out_dir.iterdir()):
        parts.append(f"{path.name} ({path.stat().st_size / 1024:.0f} KB)")
    return ", ".join(parts)


def safetensors_keys(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


@torch.inference_mode()
def greedy(model, tokenizer, question: str) -> str:
    enc = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@torch.inference_mode()
def classify(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[list[float]]:
    probs = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt")
        probs += model(**enc).logits.float().softmax(-1).tolist()
    return probs


def accuracy(model, tokenizer, examples) -> float:
    probs = classify(model, tokenizer, [t for t, _ in examples])
    return sum(int(p[1] > p[0]) == y for p, (_, y) in zip(probs, examples)) / len(examples)


def code_block(text: str) -> str:
    return "```text\n" + (text or "(empty)") + "\n```"


# ------------------------------------------------------------------------------------------------ adapters


class Trainer:
    def __init__(self, folder: Path, out: Path):
        self.folder = folder
        self.out = out
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._base_answers: dict[str, str] | None = None

    def causal_base(self):
        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32)

    def base_answers(self) -> dict[str, str]:
        if self._base_answers is None:
            base = self.causal_base().eval()
            self._base_answers = {q: greedy(base, self.tokenizer, q) for q in EVAL_QUESTIONS}
            del base
        return self._base_answers

    # -- 1. sentiment-lora ----------------------------------------------------------------------------
    def sentiment(self, name: str = "sentiment-lora") -> str:
        tok = self.tokenizer
        seed_everything(SEED)
        train, test = sentiment_data(SEED)
        handwritten = handwritten_reviews()
        model = AutoModelForSequenceClassification.from_pretrained(self.folder, num_labels=2, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        model.config.id2label = dict(enumerate(LABELS))
        model.config.label2id = {label: i for i, label in enumerate(LABELS)}
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05,
                            target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, config)
        trainable, total = model.get_nb_trainable_parameters()
        model.eval()
        before = accuracy(model, tok, test)
        log(f"[{name}] {len(train)} training reviews, {len(test)} held-out; trainable {trainable:,} of {total:,}; "
            f"held-out accuracy before training {before:.1%}")
        steps, batch = 40, 16
        seconds = train_loop(model, classification_batches(tok, train, batch, random.Random(SEED)),
                             steps=steps, lr=1e-3, warmup=4, name=name)
        out_dir = self.out / name
        save_adapter(model, out_dir, self.folder, "Sentiment classifier (negative/positive) for short English "
                     "reviews: a LoRA adapter on q_proj/v_proj plus a 2-way `score` head.", labels=LABELS)
        keys = safetensors_keys(out_dir / "adapter_model.safetensors")
        score_keys = [k for k in keys if "score" in k]
        assert score_keys, f"score head missing from the saved adapter: {sorted(keys)[:5]}"
        del model

        # Reload from disk, as the service would, and evaluate on texts never seen in training.
        base = AutoModelForSequenceClassification.from_pretrained(self.folder, num_labels=2, dtype=torch.float32)
        base.config.pad_token_id = tok.pad_token_id
        reloaded = PeftModel.from_pretrained(base, str(out_dir)).eval()
        held_acc = accuracy(reloaded, tok, test)
        hand_probs = classify(reloaded, tok, [t for t, _ in handwritten])
        hand_acc = sum(int(p[1] > p[0]) == y for p, (_, y) in zip(hand_probs, handwritten)) / len(handwritten)
        log(f"[{name}] held-out accuracy {held_acc:.1%} (before training {before:.1%}); "
            f"hand-written accuracy {hand_acc:.1%}; trained {seconds:.0f}s")
        lines = [
            f"## `{name}` — LoRA, SEQ_CLS (sentiment classifier)",
            "",
            f"Labels `{json.dumps(LABELS)}` (`labels.json`). LoRA r=8, alpha=16 on q_proj/v_proj; PEFT also saves "
            f"the new `score` head ({', '.join(f'`{k}` {keys[k]}' for k in score_keys)}). "
            f"Trainable parameters {trainable:,}. Input: the raw review text (no chat template).",
            "",
            f"Trained on {len(train)} templated reviews, {steps} steps x batch {batch}, lr 1e-3, "
            f"in {seconds:.0f}s. Files: {describe_files(out_dir)}.",
            "",
            f"- Held-out accuracy ({len(test)} reviews from templates, adjectives and items never used in "
            f"training): **{held_acc:.1%}** (the base with its untrained head: {before:.1%})",
            f"- Hand-written reviews (`scripts/demo_data/sentiment_handwritten.jsonl`): **{hand_acc:.1%}** "
            f"({sum(int(p[1] > p[0]) == y for p, (_, y) in zip(hand_probs, handwritten))}/{len(handwritten)})",
            "",
            "| text | expected | predicted | p(positive) |",
            "|---|---|---|---|",
        ]
        for (text, y), p in zip(handwritten, hand_probs):
            lines.append(f"| {text} | {LABELS[y]} | {LABELS[int(p[1] > p[0])]} | {p[1]:.3f} |")
        return "\n".join(lines) + "\n"

    # -- 2./3. generation adapters --------------------------------------------------------------------
    def _causal(self, name: str, title: str, what: str, peft_config, answer_fn, steps: int, batch: int,
                lr: float, init_prefix_text: str | None = None) -> str:
        tok = self.tokenizer
        base_answers = self.base_answers()
        seed_everything(SEED)
        rows = qa_data()
        examples = causal_examples(tok, rows, answer_fn)
        model = get_peft_model(self.causal_base(), peft_config)
        if init_prefix_text is not None:
            init_prefix_from_text(model, tok, init_prefix_text)
        trainable, total = model.get_nb_trainable_parameters()
        log(f"[{name}] {len(examples)} examples, e.g. {answer_fn(rows[0], 0)!r}; trainable {trainable:,}")
        seconds = train_loop(model, causal_batches(examples, batch, tok.pad_token_id, random.Random(SEED)),
                             steps=steps, lr=lr, warmup=max(1, steps // 10), name=name)
        out_dir = self.out / name
        save_adapter(model, out_dir, self.folder, what)
        del model

        reloaded = PeftModel.from_pretrained(self.causal_base(), str(out_dir)).eval()
        lines = [
            f"## `{name}` — {title}",
            "",
            what,
            "",
            f"Trained on {len(examples)} question/answer pairs ({steps} steps x batch {batch}, lr {lr:g}) in "
            f"{seconds:.0f}s; trainable parameters {trainable:,}. Files: {describe_files(out_dir)}.",
            "",
            f"Prompts use the tokenizer's chat template (default system message, `add_generation_prompt=True`); "
            f"greedy decoding, `max_new_tokens={MAX_NEW_TOKENS}`. None of these questions is in the training data.",
            "",
        ]
        log(f"[{name}] trained {seconds:.0f}s; base vs adapter (greedy, chat template):")
        for q in EVAL_QUESTIONS:
            answer = greedy(reloaded, tok, q)
            log(f"  Q: {q}\n    base:    {base_answers[q]!r}\n    adapter: {answer!r}")
            lines += [f"**{q}**", "", "base:", "", code_block(base_answers[q]), "", f"`{name}`:", "",
                      code_block(answer), ""]
        del reloaded
        return "\n".join(lines)

    def pirate(self, name: str = "pirate-lora") -> str:
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.05,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        what = ("Trained to answer in pirate speak: opens with \"Arr, matey!\", says ye/yer/be/me, drops the g of "
                "-ing words and signs off like a pirate. LoRA r=16, alpha=32 on q/k/v/o_proj of all 30 layers.")
        return self._causal(name, "LoRA, CAUSAL_LM (pirate speak)", what, config, pirate_answer,
                            steps=36, batch=8, lr=8e-4)

    def concise(self, name: str = "concise-prefix") -> str:
        config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16, prefix_projection=False)
        what = ("Answers in one short sentence that starts with \"Short answer:\" (the base rambles for "
                "paragraphs). Prefix tuning / P-tuning v2: 16 virtual key/value tokens in every layer, "
                "`prefix_projection=False`; the prefix starts from the keys/values of a short instruction.")
        return self._causal(name, "prefix tuning, CAUSAL_LM (short answers)", what, config, concise_answer,
                            steps=50, batch=8, lr=2e-2,
                            init_prefix_text="Answer the question below in just one short sentence that starts with: Short answer:")


@torch.no_grad()
def init_prefix_from_text(peft_model, tokenizer, text: str) -> None:
    """Start the prefix from the base model's own keys/values for ``text`` instead of random noise.

    PEFT stores the prefix as an embedding of shape (num_virtual_tokens, num_layers * 2 * kv_dim), read as
    (tokens, layer*2 + {0: key, 1: value}, kv_heads, head_dim). Real keys/values give a sane starting point,
    so the high learning rate prefix tuning needs does not first have to undo random noise.
    """
    config = peft_model.peft_config["default"]
    n = config.num_virtual_tokens
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) >= n, f"the prefix init text needs at least {n} tokens, got {len(ids)}"
    base = peft_model.get_base_model()
    cache = base(input_ids=torch.tensor([ids[:n]]), use_cache=True).past_key_values
    layers = []
    for layer in range(config.num_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (kv_heads, n, head_dim)
        layers += [keys.transpose(0, 1), values.transpose(0, 1)]  # (n, kv_heads, head_dim) each
    weight = torch.stack(layers, dim=1).reshape(n, -1)  # (n, num_layers*2*kv_heads*head_dim)
    embedding = peft_model.prompt_encoder["default"].embedding
    assert embedding.weight.shape == weight.shape, (embedding.weight.shape, weight.shape)
    embedding.weight.copy_(weight)


ADAPTERS = {"sentiment-lora": Trainer.sentiment, "pirate-lora": Trainer.pirate, "concise-prefix": Trainer.concise}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "adapters_store", help="adapter store to write into")
    parser.add_argument("--only", action="append", choices=sorted(ADAPTERS), help="train only this adapter "
                        "(repeatable); default: all three")
    parser.add_argument("--report", type=Path, default=REPORT_PATH, help="where to write the markdown report")
    args = parser.parse_args()

    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    folder = embedded_model_folder(Path.home() / ".cache" / "adapter-service")
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(folder, args.out)
    names = args.only or list(ADAPTERS)
    log(f"base model folder: {folder}\nadapters: {', '.join(names)} -> {args.out}")

    started = time.perf_counter()
    sections = read_report_sections(args.report) if args.only else {}
    for name in names:
        t0 = time.perf_counter()
        sections[name] = ADAPTERS[name](trainer, name)
        log(f"[{name}] done in {time.perf_counter() - t0:.0f}s (training, saving, reloading and evaluating)\n")
    total = time.perf_counter() - started

    header = (
        "# Demo adapters\n\n"
        f"Trained by `scripts/train_demo_adapters.py` on {HUB_ID} (the embedded base) with transformers + PEFT "
        f"on CPU ({torch.get_num_threads()} threads), seed {SEED}; training times are wall clock per adapter on a 2-core machine (they vary with load). Each adapter "
        "was reloaded from its folder with `PeftModel.from_pretrained` before the outputs below were produced.\n"
    )
    ordered = [sections[n] for n in ADAPTERS if n in sections] + [v for n, v in sections.items() if n not in ADAPTERS]
    report = header + "\n" + "\n".join(section.rstrip("\n") + "\n" for section in ordered)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    log(report)
    log(f"report written to {args.report}; {', '.join(names)} took {total:.0f}s in all")


def read_report_sections(path: Path) -> dict[str, str]:
    """The per-adapter sections of an earlier report, so that --only replaces just its own."""
    if not path.is_file():
        return {}
    sections = {}
    for chunk in re.split(r"(?m)^(?=## `)", path.read_text()):
        match = re.match(r"## `([^`]+)`", chunk)
        if match:
            sections[match.group(1)] = chunk
    return sections


if __name__ == "__main__":
    main()
