"""``sra chat DIR``: a minimal streaming chat to try a model by hand; ``--compare BASE`` answers with both.

Turns come from ``--prompt`` (repeatable, for scripts) or from stdin, one line each; an empty line,
``exit`` or end of input stops. Replies are greedy and stream token by token (`TextIteratorStreamer`).
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, field
from threading import Thread
from typing import Iterator, Optional

from ..prompts import chat_template_kwargs, format_messages
from . import summary
from .args import template_kwargs
from .loading import load_model


@dataclass
class ChatArguments:
    _argument_group_name = "chat"
    compare: Optional[str] = field(default=None, metadata={"help": "A base model id or folder: show its reply before each "
                                                                          "edited reply.", "metavar": "BASE"})
    prompt: list[str] = field(default_factory=list, metadata={"help": "Turns to send instead of reading stdin.",
                                                                                "metavar": "TEXT"})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply, in tokens.", "metavar": "N"})
    system_prompt: Optional[str] = field(default=None, metadata={"help": "System message for the chat template.",
                                                                                  "metavar": "TEXT"})


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
    """Greedy reply to ``messages``, yielded as text pieces while `generate` runs in a thread."""
    from transformers import TextIteratorStreamer

    from ..batching import input_device

    text = format_messages(tokenizer, messages)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(input_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    worker = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=max_new_tokens,
                                                      do_sample=False, temperature=None, top_p=None, top_k=None,
                                                      pad_token_id=pad))
    worker.start()
    try:
        yield from streamer
    finally:
        worker.join()


def _turns(args: argparse.Namespace) -> Iterator[str]:
    if args.prompt:
        yield from args.prompt
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip().lower() in ("", "exit", "quit"):
            return
        yield line.strip()


def run(args: argparse.Namespace) -> int:
    with chat_template_kwargs(template_kwargs(args)):
        return _chat(args)


def _chat(args: argparse.Namespace) -> int:
    load = dict(dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    chats = {}
    if args.compare:
        chats["base"] = load_model(args.compare, **load)
    chats["edited" if args.compare else "model"] = load_model(args.model, **load)
    histories = {name: [] if not args.system_prompt else [{"role": "system", "content": args.system_prompt}]
                 for name in chats}
    out = io.StringIO() if args.json else sys.stdout  # --json: one line at the end instead of a live stream
    turns = []
    for turn in _turns(args):
        turns.append({"prompt": turn})
        for name, (model, tokenizer) in chats.items():
            history = histories[name]
            history.append({"role": "user", "content": turn})
            out.write(f"[{name}] ")
            pieces = []
            for piece in stream_reply(model, tokenizer, history, args.max_new_tokens):
                out.write(piece)
                out.flush()
                pieces.append(piece)
            out.write("\n")
            out.flush()
            history.append({"role": "assistant", "content": "".join(pieces)})
            turns[-1][name] = history[-1]["content"]
    if args.json:
        summary.emit({"command": "chat", "model": args.model, "compare": args.compare, "turns": turns}, "", True)
    return 0
