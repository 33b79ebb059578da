"""A WordPiece tokenizer trained on the training split, saved as one tokenizer.json.

All normalisation (URLs and @mentions folded, Unicode NFKC, lower case) lives in
the tokenizer file itself, so the server reproduces it exactly without training
code.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
PAD_ID = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"https?://\S+|www\.\S+"), " httpurl "),
            normalizers.Replace(Regex(r"@\w+"), " @user "),
            normalizers.NFKC(),
            normalizers.Lowercase(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD_TOKEN, UNK_TOKEN],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer picks a deterministic set of tokens but numbers them in an order that
    # changes from run to run; renumber (specials first, then sorted) so that the same data
    # always gives the same ids, and so the same model.
    learned = sorted(set(tokenizer.get_vocab()) - {PAD_TOKEN, UNK_TOKEN})
    vocab = {token: index for index, token in enumerate([PAD_TOKEN, UNK_TOKEN, *learned])}
    tokenizer.model = models.WordPiece(vocab=vocab, unk_token=UNK_TOKEN)
    return tokenizer

