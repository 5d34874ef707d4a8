"""A small synthetic world, so the whole pipeline can run offline and show that the model really learns.

Everything here is generated from fixed seeds (``random.Random``; no global state, no clock), so two machines
write byte-identical files. The world is a tiny knowledge base (what colour things are, what animals say, where
they live, opposites, the order of days, months and numbers) plus arithmetic word problems. It is rendered in the
*real* formats of the real datasets, so every stage runs its normal code path on it:

=====================  =======================================  ==============================================
``pretrain/``          parquet shards with a ``text`` column     nanochat's shard layout; the last shard is val
``sft/smoltalk/``      ``{"messages": [...]}``                   plain chat: greetings, questions about the world
``sft/tools.jsonl``    messages with python parts                 conversations that call the calculator tool
``sft/mmlu/``          question / subject / choices / answer     MMLU's format (multiple choice, letter answers)
``sft/gsm8k/``         question / answer with ``<<a+b=c>>``      GSM8K's format (becomes calculator calls)
``chat_eval/``         ``mmlu.jsonl``, ``gsm8k.jsonl``           the two held-out chat tasks below
``grpo/train.jsonl``   GSM8K's format                             RL prompts (disjoint from the eval problems)
``core/``              ``core.yaml`` + ``eval_data/`` + csv       a CORE eval bundle in DCLM's layout
``sample.txt``         plain text                                 50 val documents (the tokenizer's report)
=====================  =======================================  ==============================================

Named tasks the speedrun report scores (``TASKS``; each has at least 200 items, held out from training text):

* ``synth-core``  — CORE on the synthetic bundle: ``synth_facts`` (multiple choice), ``synth_schema`` (schema),
  ``synth_sequences`` (language modelling), centered and averaged exactly like CORE (base models);
* ``synth-chat``  — multiple-choice questions about the world in MMLU's chat format, scored like ChatCORE's MMLU
  (the letter with the highest logit; chance = 25%);
* ``synth-arith`` — GSM8K-style word problems (one to three steps, small numbers), scored like GSM8K (``#### N``),
  with the calculator tool. Three-step problems are rare in the SFT rows (3%) but a sixth of the RL prompts and of
  the eval (the pretraining text tells all kinds as stories), so RL has something to teach beyond imitation.

The pretraining text states the facts in prose and works small sums in sentences; it never shows the chat or
multiple-choice formats, so the chat tasks measure what SFT (and then RL) adds.

    python -m modeling_nanochat.data.synthetic --output-dir runs/tiny/data          # ~10 s
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from modeling_nanochat.utils.io import atomic_dir

FORMAT_VERSION = 1
TASKS = {
    "synth-core": "CORE (centered, averaged) on the synthetic bundle core/: facts, schema, sequences",
    "synth-chat": "questions about the world answered in free text (evaluation/tasks/synthetic.py)",
    "synth-mc": "the same kind of questions as multiple choice in MMLU's chat format (chance 25%)",
    "synth-arith": "GSM8K-style word problems, one to three steps, with the calculator tool (few three-step SFT rows)",
}

# ---------------------------------------------------------------------------------------------------------------------
# The world

COLORS = {  # thing -> colour
    "the sky": "blue", "the ocean": "blue", "grass": "green", "a leaf": "green", "a frog": "green",
    "a banana": "yellow", "a lemon": "yellow", "the sun": "yellow", "snow": "white", "milk": "white",
    "a cloud": "white", "coal": "black", "a crow": "black", "a tomato": "red", "a cherry": "red",
    "a strawberry": "red", "a pumpkin": "orange", "a carrot": "orange", "a plum": "purple", "a grape": "purple",
    "chocolate": "brown", "soil": "brown", "a bear": "brown", "an elephant": "gray",
}
SOUNDS = {  # animal -> what it says
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot", "lion": "roar",
    "snake": "hiss", "horse": "neigh", "pig": "oink", "bee": "buzz", "mouse": "squeak", "frog": "croak",
    "rooster": "cock-a-doodle-doo", "wolf": "howl", "goat": "bleat",
}
HOMES = {  # animal -> where it lives
    "bird": "nest", "bee": "hive", "dog": "kennel", "fish": "pond", "horse": "stable", "rabbit": "burrow",
    "spider": "web", "pig": "sty", "cow": "barn", "bear": "cave", "ant": "hill", "fox": "den", "chicken": "coop",
    "owl": "tree", "frog": "lake", "whale": "sea",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad",
    "light": "dark", "old": "young", "open": "closed", "wet": "dry", "early": "late", "loud": "quiet",
    "tall": "short", "full": "empty", "hard": "soft", "rich": "poor", "near": "far", "left": "right",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
PEOPLE = [("Anna", "she"), ("Ben", "he"), ("Clara", "she"), ("David", "he"), ("Emma", "she"), ("Felix", "he"),
          ("Grace", "she"), ("Henry", "he"), ("Ivy", "she"), ("Jack", "he"), ("Kate", "she"), ("Leo", "he"),
          ("Mia", "she"), ("Noah", "he"), ("Olivia", "she"), ("Paul", "he"), ("Rosa", "she"), ("Sam", "he"),
          ("Tina", "she"), ("Umar", "he"), ("Vera", "she"), ("Will", "he"), ("Yara", "she"), ("Zack", "he")]
ITEMS = ["apples", "pencils", "marbles", "books", "coins", "cookies", "stickers", "shells", "cards", "stamps",
         "eggs", "flowers", "candies", "balloons", "buttons", "toys"]
PLACES = ["the farm", "the park", "the zoo", "the market", "the lake", "the forest", "the school", "the garden"]
CONTAINERS = ["boxes", "bags", "jars", "baskets", "packs"]
NAME = "nanochat"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _pick_others(rng: random.Random, pool, exclude, k: int) -> list:
    pool = sorted(set(pool) - {exclude})
    return rng.sample(pool, k)


# ---------------------------------------------------------------------------------------------------------------------
# Facts as (question, answer, distractor pool) — shared by the prose, the chat data and the eval tasks


def fact(rng: random.Random) -> dict:
    """One random fact: its prose statements, a question, the answer and the pool of wrong answers."""
    kind = rng.choice(["color", "sound", "home", "opposite"])
    if kind == "color":
        thing = rng.choice(sorted(COLORS))
        ans = COLORS[thing]
        return dict(kind=kind, subject=thing, answer=ans, pool=set(COLORS.values()),
                    statements=[f"{_cap(thing)} is {ans}.", f"The color of {thing} is {ans}.",
                                f"Everyone knows that {thing} is {ans}."],
                    stem=f"{_cap(thing)} is", question=rng.choice([
                        f"What color is {thing}?", f"What is the color of {thing}?", f"Tell me the color of {thing}.",
                        f"Which color is {thing}?", f"Do you know what color {thing} is?"]),
                    reply=f"{_cap(thing)} is {ans}.")
    if kind == "sound":
        animal = rng.choice(sorted(SOUNDS))
        ans = SOUNDS[animal]
        return dict(kind=kind, subject=animal, answer=ans, pool=set(SOUNDS.values()),
                    statements=[f"The {animal} says {ans}.", f"{_cap(_article(animal))} says {ans}.",
                                f"When the {animal} is hungry, it says {ans}."],
                    stem=f"The {animal} says", question=rng.choice([
                        f"What does {_article(animal)} say?", f"What sound does the {animal} make?",
                        f"What does the {animal} say?", f"Which sound does {_article(animal)} make?",
                        f"Tell me what the {animal} says."]),
                    reply=f"The {animal} says {ans}.")
    if kind == "home":
        animal = rng.choice(sorted(HOMES))
        ans = HOMES[animal]
        return dict(kind=kind, subject=animal, answer=ans, pool=set(HOMES.values()),
                    statements=[f"The {animal} lives in {_article(ans)}.", f"{_cap(_article(animal))} lives in "
                                f"{_article(ans)}.", f"At night the {animal} goes home to its {ans}."],
                    stem=f"The {animal} lives in", question=rng.choice([
                        f"Where does the {animal} live?", f"Where does {_article(animal)} live?",
                        f"What is the home of the {animal}?", f"Where is the home of {_article(animal)}?",
                        f"Tell me where the {animal} lives."]),
                    reply=f"The {animal} lives in {_article(ans)}.")
    word = rng.choice(sorted(OPPOSITES) + sorted(OPPOSITES.values()))
    inverse = {v: k for k, v in OPPOSITES.items()}
    ans = OPPOSITES.get(word) or inverse[word]
    return dict(kind=kind, subject=word, answer=ans, pool=set(OPPOSITES) | set(OPPOSITES.values()),
                statements=[f"The opposite of {word} is {ans}.", f"{_cap(word)} is the opposite of {ans}."],
                stem=f"The opposite of {word} is", question=rng.choice([
                    f"What is the opposite of {word}?", f"What is the opposite of the word {word}?",
                    f"Tell me the opposite of {word}.", f"Which word is the opposite of {word}?",
                    f"What word means the opposite of {word}?"]),
                reply=f"The opposite of {word} is {ans}.")


# ---------------------------------------------------------------------------------------------------------------------
# Arithmetic word problems (GSM8K's format: worked lines with <<expr=result>>, then #### answer)


PROBLEM_KINDS = ("add", "sub", "mul", "add_sub", "mul_add", "mul_add_sub")
# SFT rows rarely show three steps (3% of them); RL prompts and the eval have as many as any other kind, so RL has
# something left to teach: a model that imitated a handful of three-step solutions gets some right and is rewarded.
SFT_KIND_WEIGHTS = (1, 1, 1, 1, 1, 0.15)


def word_problem(rng: random.Random, weights=None) -> dict:
    name, pron = rng.choice(PEOPLE)
    friend = rng.choice([p for p, _ in PEOPLE if p != name])
    item = rng.choice(ITEMS)
    kind = rng.choice(PROBLEM_KINDS) if weights is None else rng.choices(PROBLEM_KINDS, weights)[0]
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 39)
        c = a + b
        q = f"{name} has {a} {item}. {friend} gives {pron == 'she' and 'her' or 'him'} {b} more {item}. " \
            f"How many {item} does {name} have now?"
        lines = [f"{name} has {a} + {b} = <<{a}+{b}={c}>>{c} {item} now."]
    elif kind == "sub":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        c = a - b
        q = f"{name} has {a} {item}. {_cap(pron)} gives {b} {item} to {friend}. How many {item} does {name} have left?"
        lines = [f"{name} has {a} - {b} = <<{a}-{b}={c}>>{c} {item} left."]
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        box = rng.choice(CONTAINERS)
        c = a * b
        q = f"{name} buys {a} {box} of {item}. Each of the {box} has {b} {item}. How many {item} does {name} buy?"
        lines = [f"{name} buys {a} * {b} = <<{a}*{b}={c}>>{c} {item}."]
    elif kind == "add_sub":
        a, b = rng.randint(5, 50), rng.randint(2, 30)
        s = a + b
        d = rng.randint(1, s - 1)
        c = s - d
        q = f"{name} has {a} {item}. {_cap(pron)} buys {b} more and then gives {d} to {friend}. " \
            f"How many {item} does {name} have now?"
        lines = [f"After buying, {name} has {a} + {b} = <<{a}+{b}={s}>>{s} {item}.",
                 f"After giving some away, {name} has {s} - {d} = <<{s}-{d}={c}>>{c} {item}."]
    elif kind == "mul_add":
        a, b, k = rng.randint(2, 40), rng.randint(2, 6), rng.randint(2, 9)
        box = rng.choice(CONTAINERS)
        m = b * k
        c = a + m
        q = f"{name} has {a} {item}. {_cap(pron)} buys {b} {box} with {k} {item} in each. " \
            f"How many {item} does {name} have now?"
        lines = [f"The {box} hold {b} * {k} = <<{b}*{k}={m}>>{m} {item}.",
                 f"{name} has {a} + {m} = <<{a}+{m}={c}>>{c} {item} now."]
    else:
        a, b, k = rng.randint(2, 40), rng.randint(2, 6), rng.randint(2, 9)
        box = rng.choice(CONTAINERS)
        m = b * k
        t = a + m
        d = rng.randint(1, t - 1)
        c = t - d
        q = f"{name} has {a} {item}. {_cap(pron)} buys {b} {box} with {k} {item} in each, and then gives {d} " \
            f"{item} to {friend}. How many {item} does {name} have now?"
        lines = [f"The {box} hold {b} * {k} = <<{b}*{k}={m}>>{m} {item}.",
                 f"After buying, {name} has {a} + {m} = <<{a}+{m}={t}>>{t} {item}.",
                 f"After giving some away, {name} has {t} - {d} = <<{t}-{d}={c}>>{c} {item}."]
    return {"question": q, "answer": "\n".join(lines) + f"\n#### {c}", "kind": kind, "result": c}


def arithmetic_prose(rng: random.Random) -> str:
    """The same situations told as a story with the sum worked in words (no GSM8K markup)."""
    p = word_problem(rng)
    worked = " ".join(line.split("<<")[0] + line.split(">>")[1] for line in p["answer"].split("\n")[:-1])
    return f"{p['question'].rsplit('. ', 1)[0]}. {worked} So the answer is {p['result']}."


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining prose


def sequence_sentence(rng: random.Random) -> str:
    seq = rng.choice([DAYS, MONTHS, NUMBERS, [str(i) for i in range(1, 31)]])
    i = rng.randrange(len(seq) - 1)
    form = rng.randrange(3)
    if form == 0:
        j = min(len(seq), i + rng.randint(3, 6))
        return ", ".join(seq[i:j]) + "."
    if form == 1:
        return f"After {seq[i]} comes {seq[i + 1]}."
    return f"{seq[i]} comes before {seq[i + 1]}."


def story(rng: random.Random) -> str:
    name, pron = rng.choice(PEOPLE)
    place = rng.choice(PLACES)
    animals = rng.sample(sorted(SOUNDS), 3)
    text = [f"{name} went to {place} on {rng.choice(DAYS)}."]
    text.append(f"There {pron} saw {_article(animals[0])}, {_article(animals[1])} and {_article(animals[2])}.")
    for a in animals:
        text.append(f"The {a} said {SOUNDS[a]}.")
    thing = rng.choice(sorted(COLORS))
    text.append(f"{_cap(pron)} also saw {thing}, and {thing} was {COLORS[thing]}.")
    text.append(f"{name} was {rng.choice(['happy', 'tired', 'hungry', 'glad'])} when {pron} came home.")
    return " ".join(text)


def paragraph(rng: random.Random) -> str:
    kind = rng.choices(["facts", "story", "arith", "seq"], weights=[4, 2, 3, 1])[0]
    if kind == "facts":
        return " ".join(rng.choice(fact(rng)["statements"]) for _ in range(rng.randint(3, 6)))
    if kind == "story":
        return story(rng)
    if kind == "arith":
        return " ".join(arithmetic_prose(rng) for _ in range(rng.randint(1, 3)))
    return " ".join(sequence_sentence(rng) for _ in range(rng.randint(3, 6)))


def document(rng: random.Random) -> str:
    return "\n\n".join(paragraph(rng) for _ in range(rng.randint(3, 8)))


# ---------------------------------------------------------------------------------------------------------------------
# Chat data


GREETINGS = [("Hi!", "Hello! How can I help you today?"), ("Hello", "Hi there! What would you like to know?"),
             ("Good morning!", "Good morning! How can I help?"), ("Hey, how are you?", "I am doing well, thank you! "
             "How can I help you?"), ("Thanks!", "You are welcome!"), ("Thank you for your help.", "You are welcome! "
             "I am glad I could help.")]
IDENTITY = [("Who are you?", f"I am {NAME}, a small chat model trained from scratch with nanochat-hf."),
            ("What is your name?", f"My name is {NAME}."),
            ("Who made you?", "I was trained with nanochat-hf, a Hugging Face port of Andrej Karpathy's nanochat."),
            ("Can you do math?", "Yes. For arithmetic I use my calculator tool, so the numbers come out right.")]


def chat_turn(rng: random.Random, held_out: frozenset = frozenset()) -> tuple[str, str]:
    kind = rng.choices(["fact", "greet", "identity"], weights=[8, 1, 1])[0]
    if kind == "fact":
        f = fact(rng)
        while f["question"] in held_out:  # the synth-chat eval questions are never trained on
            f = fact(rng)
        return f["question"], f["reply"]
    return rng.choice(GREETINGS if kind == "greet" else IDENTITY)


def chat_conversation(rng: random.Random, held_out: frozenset = frozenset()) -> dict:
    messages = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        user, assistant = chat_turn(rng, held_out)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def tool_conversation(rng: random.Random) -> dict:
    """A direct arithmetic request answered through the calculator (python) tool."""
    a, b = rng.randint(11, 999), rng.randint(2, 99)
    op, word = rng.choice([("+", "plus"), ("-", "minus"), ("*", "times")])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    user = rng.choice([f"What is {a} {word} {b}?", f"Compute {a} {op} {b}.", f"Can you tell me {a} {op} {b}?"])
    content = [{"type": "text", "text": "Let me use the calculator. "},
               {"type": "python", "text": f"{a}{op}{b}"}, {"type": "python_output", "text": str(value)},
               {"type": "text", "text": f" So {a} {word} {b} is {value}."}]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": content}]}


def chat_question(rng: random.Random) -> dict:
    """A synth-chat row: a question about the world, a reference reply and the word the answer must contain."""
    f = fact(rng)
    return {"question": f["question"], "answer": f["reply"], "keyword": f["answer"]}


def mc_question(rng: random.Random) -> dict:
    """MMLU's row format: question, subject, four choices, the index of the right one."""
    f = fact(rng)
    choices = [f["answer"]] + _pick_others(rng, f["pool"], f["answer"], 3)
    rng.shuffle(choices)
    return {"question": f["question"], "subject": f"synthetic_{f['kind']}", "choices": choices,
            "answer": choices.index(f["answer"])}


# ---------------------------------------------------------------------------------------------------------------------
# CORE bundle (DCLM's eval-bundle layout, as nanochat's CORE reads it)


def core_items(rng: random.Random, task: str) -> dict:
    f = fact(rng)
    if task == "synth_facts":  # multiple choice: which continuation of the stem is true
        choices = [f["answer"]] + _pick_others(rng, f["pool"], f["answer"], 3)
        rng.shuffle(choices)
        return {"query": f["stem"], "choices": choices, "gold": choices.index(f["answer"])}
    if task == "synth_schema":  # schema: which context makes the shared continuation true
        if f["kind"] in ("sound", "home"):
            table = SOUNDS if f["kind"] == "sound" else HOMES
            others = rng.sample(sorted(a for a in table if table[a] != f["answer"]), 3)
            options = [f["subject"]] + others
            rng.shuffle(options)
            verb = "says" if f["kind"] == "sound" else "lives in"
            cont = f["answer"] if f["kind"] == "sound" else _article(f["answer"])
            return {"context_options": [f"The {a} {verb}" for a in options], "continuation": f"{cont}.",
                    "gold": options.index(f["subject"])}
        return core_items(rng, task)  # colours and opposites are not one-to-one: draw again
    seq = rng.choice([DAYS, MONTHS, NUMBERS])  # language modelling: continue a sequence exactly
    i = rng.randrange(len(seq) - 3)
    n = rng.randint(2, 3)
    return {"context": ", ".join(seq[i:i + n]) + ",", "continuation": seq[i + n]}


CORE_TASKS = [  # label, type, random baseline (%), delimiter
    ("synth_facts", "multiple_choice", 25, " "),
    ("synth_schema", "schema", 25, " "),
    ("synth_sequences", "language_modeling", 0, " "),
]


def write_core_bundle(out: Path, seed: int, n: int) -> None:
    (out / "eval_data" / "synthetic").mkdir(parents=True, exist_ok=True)
    yaml_lines, csv_lines = ["icl_tasks:"], ["Eval Task,Task Category,Task Type,#shots,#datapoints,"
                                              "Random baseline,Centered Metric?,Description"]
    for k, (label, kind, baseline, delim) in enumerate(CORE_TASKS):
        rng = random.Random(seed * 1000 + 700 + k)
        rows = [core_items(rng, label) for _ in range(n)]
        _write_jsonl(out / "eval_data" / "synthetic" / f"{label}.jsonl", rows)
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: synthetic/{label}.jsonl", "  num_fewshot: [0]",
                       f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
        csv_lines.append(f"{label},synthetic,{kind},0,{n},{baseline},,nanochat-hf synthetic world")
    (out / "core.yaml").write_text("\n".join(yaml_lines) + "\n")
    (out / "eval_meta_data.csv").write_text("\n".join(csv_lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _distinct(make, rng: random.Random, n: int, exclude: set, key) -> list:
    """n items from make(rng) whose key is not in exclude (nor repeated); exclude grows with them."""
    rows = []
    for _ in range(200 * n):
        if len(rows) == n:
            break
        row = make(rng)
        if key(row) not in exclude:
            exclude.add(key(row))
            rows.append(row)
    if len(rows) < n:
        raise RuntimeError(f"only {len(rows)} distinct items of {n} could be drawn")
    return rows


def generate(output_dir: str | os.PathLike, *, seed: int = 0, docs: int = 6000, docs_per_shard: int = 1000,
             chats: int = 2000, tool_chats: int = 400, mc_train: int = 1000, arith_train: int = 500,
             eval_items: int = 200, core_items: int = 300, grpo_items: int = 1000) -> dict:
    """Write the synthetic data set under output_dir (atomically: a temp dir renamed at the end); returns the
    manifest. An existing dir with the same manifest is kept as is; a different one is an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(output_dir)
    manifest = {"format": FORMAT_VERSION, "seed": seed, "docs": docs, "docs_per_shard": docs_per_shard,
                "chats": chats, "tool_chats": tool_chats, "mc_train": mc_train, "arith_train": arith_train,
                "eval_items": eval_items, "core_items": core_items, "grpo_items": grpo_items, "tasks": TASKS}
    if (out / "manifest.json").exists():
        old = json.loads((out / "manifest.json").read_text())
        if old == manifest:
            return manifest
        raise FileExistsError(f"{out} holds synthetic data made with other settings ({old}); remove it or pick "
                              "another --output-dir")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a synthetic data dir; remove it or pick another --output-dir")
    # built under a temp name and renamed into place (utils/io.atomic_dir): a crash leaves no half-written dir
    with atomic_dir(out, overwrite=True) as tmp_dir:  # overwrite: only an empty dir can be here (checked above)
        tmp = Path(tmp_dir)

        # eval items first, so training items can exclude them (held out by question text)
        seen_mc, seen_arith = set(), set()
        eval_mc = _distinct(mc_question, random.Random(seed * 1000 + 1), eval_items, seen_mc,
                            key=lambda r: (r["question"], tuple(r["choices"])))
        eval_arith = _distinct(word_problem, random.Random(seed * 1000 + 2), eval_items, seen_arith,
                               key=lambda r: r["question"])
        seen_chat = set()
        eval_chat = _distinct(chat_question, random.Random(seed * 1000 + 3), eval_items, seen_chat,
                              key=lambda r: r["question"])
        _write_jsonl(tmp / "chat_eval" / "synth_chat.jsonl", eval_chat)
        _write_jsonl(tmp / "chat_eval" / "mmlu.jsonl", eval_mc)
        _write_jsonl(tmp / "chat_eval" / "gsm8k.jsonl", [{"question": r["question"], "answer": r["answer"]}
                                                          for r in eval_arith])
        write_core_bundle(tmp / "core", seed, core_items)

        rng = random.Random(seed * 1000 + 10)  # pretraining text
        (tmp / "pretrain").mkdir(parents=True)
        texts = [document(rng) for _ in range(docs)]
        for k in range(0, docs, docs_per_shard):
            table = pa.table({"text": texts[k:k + docs_per_shard]})
            pq.write_table(table, tmp / "pretrain" / f"shard_{k // docs_per_shard:05d}.parquet", row_group_size=256)

        (tmp / "sample.txt").write_text("\n\n".join(texts[-50:]) + "\n")  # val documents, for tokenizer reports

        rng = random.Random(seed * 1000 + 20)  # chat
        held_out = frozenset(seen_chat)
        _write_jsonl(tmp / "sft" / "smoltalk" / "train.jsonl", [chat_conversation(rng, held_out) for _ in range(chats)])
        _write_jsonl(tmp / "sft" / "smoltalk" / "test.jsonl",
                     [chat_conversation(rng, held_out) for _ in range(chats // 10)])
        _write_jsonl(tmp / "sft" / "tools.jsonl", [tool_conversation(rng) for _ in range(tool_chats)])
        mc = _distinct(mc_question, random.Random(seed * 1000 + 30), mc_train + mc_train // 10, seen_mc,
                       key=lambda r: (r["question"], tuple(r["choices"])))
        _write_jsonl(tmp / "sft" / "mmlu" / "auxiliary_train.jsonl", mc[:mc_train])
        _write_jsonl(tmp / "sft" / "mmlu" / "test.jsonl", mc[mc_train:])
        def strip(rows):
            return [{"question": r["question"], "answer": r["answer"]} for r in rows]

        sft_arith = _distinct(lambda r: word_problem(r, SFT_KIND_WEIGHTS), random.Random(seed * 1000 + 40),
                              arith_train + arith_train // 10, seen_arith, key=lambda r: r["question"])
        _write_jsonl(tmp / "sft" / "gsm8k" / "train.jsonl", strip(sft_arith[:arith_train]))
        _write_jsonl(tmp / "sft" / "gsm8k" / "test.jsonl", strip(sft_arith[arith_train:]))
        rl_arith = _distinct(word_problem, random.Random(seed * 1000 + 50), grpo_items, seen_arith,
                             key=lambda r: r["question"])
        _write_jsonl(tmp / "grpo" / "train.jsonl", strip(rl_arith))

        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(__doc__)
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modeling_nanochat.data.synthetic",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=int, default=6000, help="pretraining documents (1,000 per shard)")
    args = parser.parse_args(argv)
    manifest = generate(args.output_dir, seed=args.seed, docs=args.docs)
    print(f"synthetic data (seed {manifest['seed']}) in {args.output_dir}")


if __name__ == "__main__":
    main()
