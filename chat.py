"""Talk to a checkpoint about an image: a multi-turn chat in the terminal, or scripted through stdin.

    python chat.py --model runs/finetune/final --image demo_data/images/test_00000.png
    >>> Is there a lesion in this image?
    yes
    >>> 病灶在哪里？
    ...
    printf 'What modality is this?\\n/image scans.zip:ct/0001.dcm\\nIs it normal?\\n' | python chat.py --model CKPT

Our checkpoints, transformers-LLaVA and original-LLaVA folders alike (model.from_pretrained), asked
the way the checkpoint was trained (its prompt policy, as eval.py asks it): the first answer equals
`eval.py --model CKPT --image FILE --question Q`'s for the same settings.

The conversation is one growing token sequence, laid out as training lays out a multi-turn record:
[prefix, system, image placeholders, question 1, answer header] answer 1 [end of answer, question 2,
answer header] answer 2 ... A `model.Session` keeps the KV caches of everything said so far, so a
new turn prefills only its bracket: neither the image nor the history is encoded again.

When stdin is not a terminal, every line is a question or a command and stdout holds only the
answers, each followed by a newline; messages go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

import data
import errors
import eval as E
import model

COMMANDS = """commands:
  /image PATH     attach or replace the image (PNG, JPG, DICOM; a file or archive.zip:member) and start
                  a new conversation: the image goes first, as in training. /image alone removes it.
  /system TEXT    set the system prompt and start a new conversation (/system alone: none)
  /reset          start a new conversation (the image stays attached)
  /save FILE      append the conversation to FILE as one LLaVA-format JSON line (training data)
  /help, /quit"""


# ---- the conversation ----------------------------------------------------------------------------


class Chat:
    """A conversation with one model: the prompt policy, the attached image, the turns so far, and
    the token ids of the whole conversation, which the Session's KV caches hold."""

    def __init__(self, m: model.DoctorSun, tok: data.Tokenizer, policy: data.PromptPolicy, *,
                 max_new_tokens: int = 256, seed: int = 0, reuse_cache: bool = True, **sampling):
        self.m, self.tok, self.policy = m, tok, policy
        self.system = policy.system
        self.max_new_tokens, self.sampling, self.reuse_cache = max_new_tokens, sampling, reuse_cache
        device = m.llm.embed_tokens.weight.device
        # One generator for the whole chat, seeded as eval.py seeds its one question.
        self.generator = torch.Generator(device).manual_seed(seed) if sampling.get("do_sample") else None
        self.stops = data.stop_ids(tok, m.config.llm.eos_token_id)
        self.image = None  # the spec as given (a path or archive.zip:member)
        self.pixel_values = None  # (1, 3, S, S)
        self.reset()

    def reset(self) -> None:
        """Forget the turns (not the image or the system prompt)."""
        self.turns: list[tuple[str, str]] = []  # (question, answer text)
        self.ids: list[int] = []  # the conversation up to the end of the last answer
        self.session = model.Session(self.m)
        self.last_stats = {}

    def set_image(self, spec: str | None) -> None:
        if spec is None:
            self.image = self.pixel_values = None
        else:
            img = open_image(spec)
            dtype = self.m.llm.embed_tokens.weight.dtype
            p = self.policy
            self.pixel_values = data.preprocess_image(img, self.m.config.vision.image_size, p.pad_to_square,
                                                      mean=p.image_mean, std=p.image_std)[None].to(
                self.m.llm.embed_tokens.weight.device, dtype)
            self.image = spec
        self.reset()

    def set_system(self, text: str) -> None:
        if text and not data.TEMPLATES[self.policy.template].system:
            raise ValueError(f"the {self.policy.template!r} template has no system prompt")
        self.system = text
        self.reset()

    def prompt(self, question: str) -> list[int]:
        """The whole conversation's ids with this question asked, ending at the answer header."""
        if not self.turns:  # eval.py's own prompt: the first answer is eval.py's answer
            ex = E.Example(id="0", question=question, gold="", image=self.image, prompt=question)
            return E.encode(ex, self.tok, self.m, self.policy.template, self.system)
        if data.IMAGE_TOKEN in question:
            raise ValueError(f"{data.IMAGE_TOKEN} in a later question: the image goes first (/image PATH)")
        return self.ids + data.encode_later_turn(question, self.tok, self.policy.template, image_token_id=self.m.image_token_id)

    def ask(self, question: str, out=None) -> str:
        """Answer one question, streaming the text to `out` (then a newline, as eval.py prints)."""
        ids = self.prompt(question)
        printer = E.TokenPrinter(self.tok, self.stops, out) if out is not None else None
        if not self.reuse_cache:  # for comparison: prefill the whole conversation, image included
            self.session = model.Session(self.m)
        held, times = len(self.session.ids), [time.perf_counter()]

        def stream(step_tokens):
            if len(times) == 1:
                times.append(time.perf_counter())  # the first token: the latency a user feels
            if printer is not None:
                printer(step_tokens)

        try:
            new = self.session.generate(ids, self.pixel_values, self.max_new_tokens, stop_token_ids=self.stops,
                                        generator=self.generator, streamer=stream, **self.sampling)
        except BaseException:  # interrupted or failed mid-turn: the caches may hold a partial answer
            self.session = model.Session(self.m)
            raise
        t = time.perf_counter()
        self.last_stats = {"prefilled": len(ids) - held, "generated": len(new), "seconds": t - times[0],
                           "first_token_seconds": (times[1] if len(times) > 1 else t) - times[0]}
        if printer is not None:  # whatever the stream held back (an incomplete character), then a newline
            full = self.tok.decode(printer.ids)
            out.write((full[len(printer.shown):] if full.startswith(printer.shown) else "") + "\n")
            out.flush()
        answer = data.decode_answer(new, self.tok, self.stops)
        body = new[:-1] if new and new[-1] in self.stops else new
        self.ids = ids + body + data.answer_end_ids(self.tok, self.policy.template)
        self.turns.append((question, answer))
        return answer

    def record(self) -> dict:
        """The conversation as a LLaVA-format record; `image` is relative to `image_root` (a folder or
        .zip), as data.py's `file@root` data specs read it."""
        if not self.turns:
            raise ValueError("nothing to save yet")
        conv = [{"from": "system", "value": self.system}] if self.system != self.policy.system else []
        for k, (q, a) in enumerate(self.turns):
            q = data.IMAGE_TOKEN + "\n" + q.replace(data.IMAGE_TOKEN, "").strip() if k == 0 and self.image else q
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rec = {"id": f"chat-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{len(self.turns)}"}
        if self.image:
            root, member = split_image_spec(self.image)
            rec["image"] = member or os.path.basename(root)
            rec["image_root"] = os.path.abspath(root if member else os.path.dirname(root) or ".")
        rec["conversations"] = conv
        return rec

    def save(self, path) -> dict:
        rec = self.record()
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return rec


def split_image_spec(spec: str) -> tuple[str, str | None]:
    """"scans.zip:ct/1.dcm" -> ("scans.zip", "ct/1.dcm"); a plain path -> (path, None)."""
    m = re.match(r"(.+?\.zip):(.+)$", spec, flags=re.IGNORECASE)
    if m and not os.path.isfile(spec):
        return m.group(1), m.group(2)
    return spec, None


def open_image(spec: str):
    """A PIL image from a file or a zip member (data.ImageSource reads archives in place)."""
    root, member = split_image_spec(spec)
    if member is None:
        return data.load_image(root)
    return data.ImageSource(root).open(member)


# ---- the loop ------------------------------------------------------------------------------------


def command(chat: Chat, line: str, err) -> bool:
    """Run one /command; False means quit. Messages go to `err`."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/image":
        chat.set_image(arg or None)
        print(f"[image {arg}; new conversation]" if arg else "[no image; new conversation]", file=err)
    elif name == "/system":
        chat.set_system(arg)
        print(f"[system prompt {arg!r}; new conversation]", file=err)
    elif name == "/reset":
        chat.reset()
        print("[new conversation]", file=err)
    elif name == "/save":
        if not arg:
            raise ValueError("/save needs a file name")
        rec = chat.save(arg)
        print(f"[appended {rec['id']} ({len(chat.turns)} turns) to {arg}]", file=err)
        if any(not a for _, a in chat.turns):
            print("[an answer is empty: training skips this record (empty_answer)]", file=err)
    elif name == "/help":
        print(COMMANDS, file=err)
    else:
        raise ValueError(f"unknown command {name} (/help lists them)")
    return True


def converse(chat: Chat, lines, out, err, stats: bool = False) -> None:
    """Questions and commands from `lines` (an iterable of strings); answers streamed to `out`."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not command(chat, line, err):
                    return
                continue
            chat.ask(line, out)
            if stats:
                s = chat.last_stats
                print(f"[prefilled {s['prefilled']} tokens, first token after {s['first_token_seconds']:.3f} s, "
                      f"generated {s['generated']} in {s['seconds']:.3f} s]", file=err)
        except (ValueError, OSError) as e:  # data.SampleError is a ValueError: a bad image, a full context
            print(f"error: {e}", file=err)


def terminal_lines(prompt=">>> "):
    """Lines typed at the terminal (with line editing where readline exists), until Ctrl-D."""
    try:
        import readline  # noqa: F401  (input() then edits lines and keeps a history)
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def parse_args(argv=None):
    p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=COMMANDS)
    p.add_argument("--model", required=True, help="our checkpoint, a llava-hf folder or an original LLaVA folder")
    p.add_argument("--image", help="an image to talk about (PNG, JPG, DICOM; a file or archive.zip:member)")
    p.add_argument("--vision", help="CLIP folder for an original LLaVA checkpoint without its vision tower")
    p.add_argument("--tokenizer", help="default: the checkpoint's recorded tokenizer, else the model folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--template", choices=sorted(data.TEMPLATES), help="default: the checkpoint's prompt policy")
    p.add_argument("--system", help="system prompt (default: the checkpoint's prompt policy)")
    p.add_argument("--pad-to-square", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as the checkpoint was trained")
    p.add_argument("--max-new-tokens", type=errors.at_least(1), default=256, help="per answer")
    E.add_sampling_flags(p)
    p.add_argument("--stats", action="store_true", help="after each answer, print tokens prefilled/generated and seconds")
    p.add_argument("--no-reuse-cache", action="store_true",
                   help="prefill the whole conversation every turn (to measure what the KV cache saves)")
    return p.parse_args(argv)


def main(argv=None, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = parse_args(argv)
    m, tok, policy, _ = E.load_model(args)
    chat = Chat(m, tok, policy, max_new_tokens=args.max_new_tokens, seed=args.seed,
                reuse_cache=not args.no_reuse_cache, do_sample=args.do_sample, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    if args.image:
        try:
            chat.set_image(args.image)
        except (ValueError, OSError) as e:  # a bad --image stops here: the user meant to ask about it
            print(f"error: --image: {e}", file=stderr)
            return 2
    if not stdin.isatty():
        converse(chat, stdin, stdout, stderr, args.stats)
        return 0
    print(f"{args.model}" + (f", image {args.image}" if args.image else "") + ". /help for commands, Ctrl-D to quit.",
          file=stderr)
    while True:
        try:
            converse(chat, terminal_lines(), stdout, stderr, args.stats)
            return 0
        except KeyboardInterrupt:  # Ctrl-C stops an answer, not the chat; the turn is dropped
            print("\n[interrupted]", file=stderr)


if __name__ == "__main__":
    errors.run(main)
