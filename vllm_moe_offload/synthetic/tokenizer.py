"""A real byte-level BPE tokenizer, trained locally, for the random checkpoints of `make-model`.

No hub access is allowed in tests or on the GPU machine, so `make-model` cannot copy Qwen's
tokenizer. It trains a byte-level BPE (any UTF-8 text encodes, any id decodes) on generated
pseudo-English and pads the vocabulary with reserved tokens so that its size equals the
model's `vocab_size` exactly, the way Qwen reserves ids past its trained merges.
"""

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
PAD_ID, EOS_ID = 0, 2
# ChatML, as Qwen uses; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_TRAINED_VOCAB = 4096  # merges learnable from the ~100 KB corpus below; the rest is reserved
_CORPUS_WORDS = 20_000


def _corpus(seed: int = 0) -> list[str]:
    """Deterministic pseudo-English: syllable words, punctuation and digits, in lines."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "th", "st"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "y"]
    codas = ["", "n", "r", "s", "t", "ng", "ll", "ck", "d"]
    lexicon = [
        "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                for _ in range(rng.randint(1, 3)))
        for _ in range(600)
    ]
    words = [rng.choice(lexicon) for _ in range(_CORPUS_WORDS)]
    lines, line = [], []
    for i, w in enumerate(words):
        line.append(w.capitalize() if not line else w)
        if rng.random() < 0.08:
            line[-1] += rng.choice([".", ",", "?", "!", f" {i % 1000}"])
        if len(line) > 12:
            lines.append(" ".join(line))
            line = []
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (>= 300)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, MAX_TRAINED_VOCAB),
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(vocab_size - len(vocab)):
        vocab[f"<|reserved_{i}|>"] = len(vocab)
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    # PreTrainedTokenizerFast loads on transformers 4.x and 5.x alike.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None,
        "model_max_length": 262144,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
