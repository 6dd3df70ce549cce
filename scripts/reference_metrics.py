#!/usr/bin/env python3
"""Reference numbers for tests/metrics.rs, from the tools the field reports with.

Run once, paste the printed Rust into tests/metrics.rs (the tests themselves
never call Python):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install rouge-score==0.1.2 nltk==3.10.4 sacrebleu==2.6.0
    /tmp/refenv/bin/python scripts/reference_metrics.py

No NLTK data download is needed: METEOR runs with a WordNet stand-in that
knows no synonyms (the Rust port has no synonym stage), and its tokens come
from sacrebleu's 13a tokenizer, which is what `nextquill::eval::metrics::meteor`
uses too.
"""

import importlib.metadata
import sys

import numpy as np

import sacrebleu
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

# (reference, hypothesis): sentences written for these tests. Python string
# escapes keep the non-ASCII cases readable in both languages.
CASES = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    (
        "I loved running in these shoes; they run true to size!",
        "Loved the shoes, runs true to size and great for runners.",
    ),
    (
        "Battery lasts 10 hours, charging takes 2.5 hours.",
        "The battery lasted about 10 hours and charged in 2.5 hours",
    ),
    (
        "GREAT product!!! Highly recommend.",
        "great Product, would highly recommend it to anyone",
    ),
    ("This blender is loud but powerful.", ""),
    ("the the the cat", "the cat the cat the cat"),
    (
        "Caf\u00e9 cr\u00e8me was tr\u00e8s bon \u2014 na\u00efve d\u00e9lice \U0001F600",
        "The caf\u00e9 was very good, a naive delight",
    ),
    (
        "Model X-200 costs $49.99 (was $59.99) in 2023-24.",
        "The X-200 model costs 49.99 dollars in 2023.",
    ),
    (
        "Don't buy it: it's cheaply made & breaks easily.",
        "Do not buy; it's cheap and it broke easily.",
    ),
    (
        "Generously sized, happily used for relational databases and nationalization.",
        "generous size, happy use of rational database nationalized",
    ),
    (
        "Arrived quickly and works exactly as described.",
        "Arrived quickly and works exactly as described.",
    ),
    ("Excellent quality", "Terrible service overall"),
    ("quick brown fox jumps over lazy dog", "lazy dog jumps over quick brown fox"),
    ("Works Well With iPhone", "works well with iphone"),
    ("Well-made, sturdy\nand easy-to-clean.", "well made sturdy and easy to clean"),
    ("Ok", "ok."),
    (
        "The skies cleared; flies were dying, agreed?",
        "sky clears, the fly dies, agree",
    ),
    (
        "I bought this kettle for my parents after our old one started leaking, and "
        "after three months of daily use it still boils a full litre in under four "
        "minutes, the lid seals properly, the handle stays cool, and the only "
        "complaint is that the blue light is far too bright at night.",
        "We bought this kettle to replace an old leaking one; after three months of "
        "daily use it still boils a litre in about four minutes, the handle stays "
        "cool and the lid seals well, but the blue light is much too bright at night.",
    ),
]


class NoSynonyms:
    """Stands in for nltk.corpus.wordnet: no word has synonyms."""

    def synsets(self, word):
        return []


def meteor_tokens(text):
    return Tokenizer13a()(text).split()


def main():
    versions = {p: importlib.metadata.version(p) for p in ["rouge-score", "nltk", "sacrebleu"]}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)

    print(f"// Python {sys.version.split()[0]}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"const CASES: [Case; {len(CASES)}] = [")
    for reference, hypothesis in CASES:
        rouge = scorer.score(reference, hypothesis)
        meteor = single_meteor_score(
            meteor_tokens(reference), meteor_tokens(hypothesis), wordnet=NoSynonyms()
        )
        bleu = sacrebleu.corpus_bleu([hypothesis], [[reference]]).score
        print("    Case {")
        print(f"        reference: {rust_str(reference)},")
        print(f"        hypothesis: {rust_str(hypothesis)},")
        print(f"        rouge_1: {float(rouge['rouge1'].fmeasure)!r},")
        print(f"        rouge_l: {float(rouge['rougeL'].fmeasure)!r},")
        print(f"        meteor: {float(meteor)!r},")
        print(f"        bleu: {float(bleu)!r},")
        print("    },")
    print("];")

    corpus = sacrebleu.corpus_bleu([h for _, h in CASES], [[r for r, _ in CASES]])
    print(f"const CORPUS_BLEU: f64 = {corpus.score!r};")
    print(f"const CORPUS_HYPOTHESIS_LEN: usize = {corpus.sys_len};")
    print(f"const CORPUS_REFERENCE_LEN: usize = {corpus.ref_len};")

    # Bootstrap: ROUGE-1 F1 per pair as one method, ROUGE-L F1 as the other.
    rouge_1 = [scorer.score(r, h)["rouge1"].fmeasure for r, h in CASES]
    rouge_l = [scorer.score(r, h)["rougeL"].fmeasure for r, h in CASES]
    differences = [a - b for a, b in zip(rouge_1, rouge_l)]
    for name, values in [("MEAN_CI", rouge_1), ("DIFF_CI", differences)]:
        lo, hi = bootstrap_mean(values, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
        print(f"const {name}: (f64, f64, f64) = ({mean(values)!r}, {lo!r}, {hi!r});")


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 42
MASK = (1 << 64) - 1


class SplitMix64:
    """The resampling generator of nextquill's bootstrap, bit for bit."""

    def __init__(self, seed):
        self.state = seed & MASK

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, bound):
        """Uniform in range(bound), Lemire's multiply-and-reject."""
        threshold = ((-bound) & MASK) % bound
        while True:
            product = self.next_u64() * bound
            if product & MASK >= threshold:
                return product >> 64


def mean(values):
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


def bootstrap_mean(values, resamples, seed):
    """95% percentile interval of the mean; numpy's default (linear) percentiles."""
    rng = SplitMix64(seed)
    n = len(values)
    means = [mean([values[rng.below(n)] for _ in range(n)]) for _ in range(resamples)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def rust_str(text):
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch in "\"\\":
            out.append("\\" + ch)
        elif ord(ch) < 128:
            out.append(ch)
        else:
            out.append(f"\\u{{{ord(ch):x}}}")
    return '"' + "".join(out) + '"'


if __name__ == "__main__":
    main()
