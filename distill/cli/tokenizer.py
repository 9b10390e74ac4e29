"""``distill tokenizer train``: a vocabulary for captions in any language."""
from __future__ import annotations

import argparse

from .args import count


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tk = sub.add_parser("tokenizer", help="train a tokenizer for captions in any language",
                        description="Learns a WordPiece (default, BERT-compatible), BPE or Unigram vocabulary from the "
                        "captions of the data sources (Unicode NFC or NFKC, accents kept, CJK characters one token "
                        "each) and writes a transformers tokenizer folder. Use it with student.kwargs.tokenizer=DIR "
                        "(a student from scratch) or student.kwargs.extend_vocab=DIR (grow a pretrained vocabulary).")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="learn a vocabulary from captions")
    tt.add_argument("sources", nargs="+", help="caption data (csv, jsonl, txt, folder...) or parallel csv files")
    tt.add_argument("--out", required=True)
    from ..vocab import MAX_VOCAB  # light: no tokenizers import until a vocabulary is trained

    tt.add_argument("--vocab", type=count(16, MAX_VOCAB), default=16000, help="vocabulary size")
    tt.add_argument("--model", default="wordpiece", choices=["wordpiece", "bpe", "unigram"])
    tt.add_argument("--normalize", default="nfc", choices=["nfc", "nfkc"])
    tt.add_argument("--lowercase", action="store_true")
    tt.add_argument("--columns", default=None, help="columns of a parallel csv to read (e.g. en,de,fr)")
    tt.add_argument("--overwrite", action="store_true", help="replace another clip-distill artifact at --out")
    tk.set_defaults(run=cmd_tokenizer)


def cmd_tokenizer(args) -> int:
    from ..vocab import token_counts, texts_of, train_tokenizer

    from ..outputs import claim, inputs_of, staged

    claim(args.out, "a tokenizer", inputs_of({"a caption source": args.sources}), overwrite=args.overwrite)
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else []
    texts = texts_of(args.sources, columns)
    tok = train_tokenizer(texts, args.vocab, args.model, args.normalize, args.lowercase)
    with staged(args.out) as tmp:
        tok.save_pretrained(str(tmp))
    counts = token_counts(tok, texts)
    total = sum(counts.values())
    print(f"trained a {args.model} tokenizer of {len(tok)} tokens on {len(texts)} captions; wrote {args.out} "
          f"({total / max(len(texts), 1):.1f} tokens per caption, [UNK] {counts[tok.unk_token_id] / max(total, 1):.2%} "
          "of the tokens)")
    return 0
