"""generate.py and sample.py: sampling, greedy text against the reference's generate(), the command line, chat
and conversations."""

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
import olmo
import sample

from conftest import FIXTURES, TOKENIZERS, as_read, e2e_checkpoint, load, run_sample

TINY = Path(__file__).parent / "notebooks" / "tiny_olmo"  # notebook 6's: byte-level (a byte, a token), context 256


def reference_greedy(cls, folder, ids, n, dtype=torch.float32, eos=None):
    """The reference's greedy generate(): the new ids, without the final end-of-text if it stopped there."""
    model = cls.from_pretrained(folder, dtype=dtype).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos or model.config.eos_token_id)
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] in ([eos] if isinstance(eos, int) else eos or [model.config.eos_token_id]) else new


def assert_greedy_as_the_reference(cls, folder, prompt_ids, new):
    """Teacher-forced: the reference reads prompt + new in bfloat16 and float32; each new token must be its bfloat16
    argmax where the top two logits are further apart than its bfloat16 logits are from its float32 ones there."""
    seq = torch.tensor([prompt_ids + new])
    logits = {dtype: cls.from_pretrained(folder, dtype=dtype).eval()(input_ids=seq).logits[0, len(prompt_ids) - 1:-1].float()
              for dtype in (torch.bfloat16, torch.float32)}
    error = (logits[torch.bfloat16] - logits[torch.float32]).abs().amax(-1)  # (len(new),)
    top = logits[torch.bfloat16].topk(2, -1)
    clear = top.values[:, 0] - top.values[:, 1] > error
    assert clear.sum() >= len(new) // 2, (clear.sum(), error)
    wrong = [i for i in range(len(new)) if clear[i] and new[i] != top.indices[i, 0]]
    assert not wrong, f"new tokens {wrong} are not the reference's clear choice"


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,extra", [("olmo", "float32", []), ("olmo2", "float32", []),
                                                ("olmo2", "bfloat16", []), ("olmo3", "float32", []),
                                                ("olmo3", "float32", ["--compile"]), ("olmoe", "float32", []),
                                                ("flex_olmo", "bfloat16", []), ("olmo_hybrid", "float32", [])])
def test_sample_greedy_equals_reference_generate(family, dtype, extra, tmp_path):
    # the mixtures of experts are saved in shards, as the released ones are
    cls = e2e_checkpoint(family, tmp_path, max_shard_size="2MB" if family in ("olmoe", "flex_olmo") else None)
    if family in ("olmoe", "flex_olmo"):
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    prompt = "The history of the  Open Language Model ist ganz 日本語 interessant:"
    ids = tok.encode(prompt).ids
    r = run_sample("--model", str(tmp_path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "40",
                   "--dtype", dtype, "--device", "cpu", *extra)
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stderr and "decode" in r.stderr and "peak" in r.stderr
    if dtype == "float32":  # float32 greedy text is the reference's, token for token
        new = reference_greedy(cls, tmp_path, ids, 40)
        assert len(new) > 20  # long enough to pass olmo3's sliding window (6) several times
        assert r.stdout == as_read(prompt + tok.decode(new, skip_special_tokens=False) + "\n")
        return
    # bfloat16: we decode with torch.mv where the reference calls F.linear, so a last bit can differ, and on random
    # weights two tokens can be that close. The text is ours (generate.generate in this process, what sample.py
    # printed), and every token of it must be the reference's choice given the same text before it, wherever the
    # reference's top two are further apart than its own bfloat16 error
    model = olmo.OlmoForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    eos = model.config.eos_token_id
    new = list(generate.generate(model, ids, 40, stop_ids={eos}))
    new = new[:-1] if new[-1] == eos else new
    # (decoded by Python, as sample.py prints: the tokenizers library replaces a broken UTF-8 sequence differently)
    assert len(new) > 20 and r.stdout == as_read(prompt + olmo.load_tokenizer(tmp_path).decode(new) + "\n")
    assert_greedy_as_the_reference(cls, tmp_path, ids, new)


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {generate.sample_next(logits, 1.0, generator=g, **kw).item() for _ in range(300)}
    assert generate.sample_next(logits, 0).item() == 0
    assert draws(top_k=2) == {0, 1}
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...: top_p=0.8 needs the first two, 0.6 only the first
    assert p[0] < 0.8 < p[0] + p[1]
    assert draws(top_p=0.8) == {0, 1}
    assert draws(top_p=0.6) == {0}
    assert draws() == {0, 1, 2, 3, 4}


GREEDY = dict(temperature=0.0, top_k=None, top_p=None)  # sample.stream and sample.converse: greedy replies


def _valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_streaming_never_prints_a_broken_character(tmp_path, monkeypatch):
    tokenizer = olmo.load_tokenizer(TOKENIZERS / "allenai_dolma2.json")
    text = "naïve 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok 👨‍👩‍👧 日本"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    assert any(b"\xef\xbf\xbd" in p or not _valid_utf8(p) for p in pieces)  # some tokens split a character
    monkeypatch.setattr(generate, "generate", lambda *a, **k: iter(ids))
    writes = []
    monkeypatch.setattr(sys, "stdout", type("W", (), {"write": lambda self, s: writes.append(s), "flush": lambda self: None})())
    model = load("olmo2")
    assert sample.stream(model, tokenizer, [5], len(ids), GREEDY) == (ids, False)  # every token, not interrupted
    assert "".join(writes) == text + "\n"
    assert not any("\ufffd" in w for w in writes)


@pytest.mark.slow
def test_prompt_from_stdin_and_file(tmp_path):
    e2e_checkpoint("olmo2", tmp_path)
    (tmp_path / "p.txt").write_text("From a file")
    common = ["--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "5", "--dtype", "float32"]
    a = run_sample(*common, "--prompt-file", str(tmp_path / "p.txt"))
    b = run_sample(*common, "--prompt", "-", stdin="From a file")
    assert a.returncode == 0 and a.stdout.startswith("From a file") and a.stdout == b.stdout


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--max-new-tokens"], "argument --max-new-tokens: expected one argument"),
    (["--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt-file", "{tmp_path}/p.txt"], "argument --prompt-file: not allowed with argument --prompt"),
])
@pytest.mark.slow
def test_a_malformed_command_line_gets_argparse_errors(args, message, tmp_path):
    # exit status 2, with the usage: the command line itself is wrong, and the usage shows how to write it
    e2e_checkpoint("olmo2", tmp_path)
    (tmp_path / "p.txt").write_text("From a file")  # a prompt file that exists: two prompts, and neither is chosen
    r = run_sample("--model", str(tmp_path), "--prompt", "hi", *[a.format(tmp_path=tmp_path) for a in args])
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert re.search(message, r.stderr.splitlines()[-1]), r.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt-file", "/nonexistent/prompt.txt"], r"--prompt-file: \[Errno 2\] No such file"),
    (["--prompt", "hi", "--device", f"cuda:{torch.cuda.device_count()}"],  # a device this machine lacks
     r"--device cuda:\d+: (CUDA is not available|this machine has \d+ CUDA device)"),
    (["--prompt", "hi", "--chat"], r"has no chat template \(chat_template.jinja, .*leave out --chat"),
    (["--prompt", "hi " * 300],  # 301 tokens
     "the prompt is 301 tokens and the model's context holds 256: shorten it to fewer than 256"),
], ids=["prompt_file", "device", "chat_template", "full_context"])
@pytest.mark.slow
def test_a_command_that_cannot_be_carried_out_is_a_one_line_error(args, message, tmp_path):
    # exit status 1, and one line without the usage: the command line is well formed, what it asks for is not there
    e2e_checkpoint("olmo2", tmp_path)
    r = run_sample("--model", str(tmp_path), *args)
    assert r.returncode == 1 and "usage:" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("sample.py: error: ") and re.search(message, last), r.stderr


@pytest.mark.slow
def test_an_empty_prompt_without_an_end_of_text_token_is_a_one_line_error(tmp_path):
    # OLMo has no start token: an empty prompt begins a document after an end-of-text token, which this tokenizer
    # (the tiny OLMo's bytes, without its <|endoftext|>) lacks
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((TINY / f).read_bytes())
    spec = json.loads((TINY / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "added_tokens": []}))
    r = run_sample("--model", str(tmp_path), "--prompt", "")
    assert r.returncode == 1 and "usage:" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == (f"sample.py: error: the prompt is empty and the tokenizer ({tmp_path}) has "
                                         "no end-of-text token to start a document from: pass a prompt")


@pytest.mark.slow
def test_bad_model_is_a_one_line_error(tmp_path):
    r = run_sample("--model", str(tmp_path / "missing"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and str(tmp_path / "missing") in r.stderr
    assert r.stderr.startswith("sample.py: error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    r = run_sample("--model", str(FIXTURES / "olmo2"), "--tokenizer", str(tmp_path / "missing"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and f"--tokenizer {tmp_path / 'missing'}: " in r.stderr
    assert r.stderr.startswith("sample.py: error: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_help_shows_the_defaults_and_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as done:
        sample.parse_args(["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help to the terminal's width
    for default in ("200", "0.8", "1", "auto", "4096"):
        assert f"(default: {default})" in out
    assert "(default: allenai/OLMo-2-0425-1B, from the Hugging Face cache or the Hub; where neither can be had, the " \
           "demo model notebooks/tiny_olmo)" in out
    for status, meaning in (("0", "done"), ("1", "the command cannot be carried out"),
                            ("2", "the command line is malformed"), ("130", "interrupted by Ctrl-C")):
        assert f" {status} {meaning}" in out


def test_without_a_model_offline_the_demo_model_runs_and_says_so(tmp_path):
    # nothing cached (an empty Hugging Face home) and the Hub out of reach: `python sample.py` still runs, on the
    # demo model, with one line saying so; a --model given explicitly is never replaced
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).parent / "sample.py"), "--prompt", "Return the", "--max-new-tokens",
               "8", "--temperature", "0"]
    r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    notice = [line for line in r.stderr.splitlines() if "demo model" in line]
    assert notice == ["(allenai/OLMo-2-0425-1B: it is not cached and the Hub is out of reach; running the small demo "
                      "model notebooks/tiny_olmo instead. For the real one: pip install huggingface_hub, then online "
                      "once: python sample.py --model allenai/OLMo-2-0425-1B)"]
    assert "loaded notebooks/tiny_olmo (olmo2" in r.stderr
    demo = run_sample("--model", str(Path(__file__).parent / "notebooks" / "tiny_olmo"), "--prompt", "Return the",
                      "--max-new-tokens", "8", "--temperature", "0")
    assert r.stdout == demo.stdout and len(r.stdout) > len("Return the")
    r = subprocess.run(command + ["--model", "allenai/OLMo-2-0425-1B"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1 and "could not download 'allenai/OLMo-2-0425-1B'" in r.stderr and "demo" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_stops_cleanly(tmp_path):
    import signal
    e2e_checkpoint("olmo2", tmp_path)
    # a context of 10**6 tokens and 200000 to generate: however slow this machine, the reply cannot have ended
    # when the signal comes, which is sent once the echo shows that the reply has begun
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**6}))
    cmd = [sys.executable, str(Path(__file__).parent / "sample.py"), "--model", str(tmp_path), "--prompt", "Hi",
           "--max-new-tokens", "200000", "--temperature", "1", "--dtype", "float32"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.read(2) == "Hi"  # the prompt is echoed once generation starts
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted; prompt 1 tokens" in err  # the stats line still comes


TULU = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\\n' + m['content'] + '\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + '\\n' }}{% else %}"
        "{{ '<|assistant|>\\n' + m['content'] + eos_token + '\\n' }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.slow
@pytest.mark.parametrize("template,family", [(TULU, "olmo2"), (CHATML, "olmo3")])
def test_chat_prompt_equals_transformers_template(template, family, tmp_path):
    e2e_checkpoint(family, tmp_path, chat_template=template)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    template_text, specials = sample.chat_template(tmp_path)
    assert sample.render_chat(template_text, specials, messages) == expected
    tokenizer = olmo.load_tokenizer(tmp_path)
    assert tokenizer.encode(expected) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False)


@pytest.mark.slow
def test_chat_generation_stops_at_end_of_turn(tmp_path):
    cls = e2e_checkpoint("olmo3", tmp_path, chat_template=CHATML)
    tokenizer = olmo.load_tokenizer(tmp_path)
    im_end = tokenizer.added["<|im_end|>"]
    config = olmo.read_config(tmp_path)
    assert sample.stop_tokens(tmp_path, config, tokenizer, chat=True) == {100257, im_end}
    prompt = "Hello there"
    text = sample.render_chat(CHATML, {}, [{"role": "user", "content": prompt}])
    new = reference_greedy(cls, tmp_path, tokenizer.encode(text), 30, eos=[100257, im_end])
    r = run_sample("--model", str(tmp_path), "--chat", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "30",
                   "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == tokenizer.decode(new) + "\n"  # only the reply is printed


# ---- a conversation (sample.py --chat without --prompt) --------------------------------------------------------


# like a Think model's template, which drops the reasoning from earlier replies: the history renders differently
# from what was generated, so the cache must be rewound to where the two part
TRUNCATING = CHATML.replace("m['content'] + '<|im_end|>", "(m['content'][:7] if m['role'] == 'assistant' else m['content']) + '<|im_end|>")
MESSAGES = ["Hello there!", "What is the capital of France?", "Tell me more about it."]


def reference_conversation(cls, folder, messages, n, system=None):
    """Each reply as the reference makes it: greedy generate() on apply_chat_template of the history so far."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>") if t in tok.get_vocab()]
    history, replies, lengths = [{"role": "system", "content": system}] if system else [], [], []
    for message in messages:
        history.append({"role": "user", "content": message})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
        lengths.append(len(ids))
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stops)
        new = out[0, len(ids):].tolist()
        replies.append(tok.decode(new[:-1] if new[-1] in stops else new, skip_special_tokens=False))
        history.append({"role": "assistant", "content": replies[-1]})
    return replies, lengths


@pytest.mark.slow
@pytest.mark.parametrize("template,family", [(TULU, "olmo2"), (CHATML, "olmo3"), (TRUNCATING, "olmo2")],
                         ids=["tulu", "chatml", "truncating"])
def test_conversation_equals_reference_turn_by_turn(template, family, tmp_path):
    cls = e2e_checkpoint(family, tmp_path, chat_template=template)
    expected, lengths = reference_conversation(cls, tmp_path, MESSAGES, 12, system="Be brief.")
    r = run_sample("--model", str(tmp_path), "--chat", "--system", "Be brief.", "--temperature", "0",
                   "--max-new-tokens", "12", "--dtype", "float32", stdin="\n".join(MESSAGES) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(reply + "\n" for reply in expected)
    assert r.stderr.count("decode ") == 3  # a statistics line per reply
    # the cache: turns 2 and 3 feed only what follows the prefix that the cache holds, where it can be rewound to
    # where the new rendering parts from what was fed (the reply as generated and as tokenized again can differ);
    # olmo3's sliding layers keep rings of 6 here, which have wrapped: those turns are computed again
    fed = [int(n) for n in re.findall(r"prompt (\d+) tokens", r.stderr)]
    assert fed[0] == lengths[0]
    assert (fed[1] < lengths[1] and fed[2] < lengths[2]) if family == "olmo2" else fed[1:] == lengths[1:]


@pytest.mark.parametrize("template,family", [(CHATML, "olmo3"), (TRUNCATING, "olmo3"), (CHATML, "olmo_hybrid")],
                         ids=["chatml", "truncating", "hybrid"])
def test_cached_conversation_equals_recomputing_every_turn(template, family, tmp_path, monkeypatch, capsys):
    e2e_checkpoint(family, tmp_path, chat_template=template)
    model, tokenizer = olmo.OlmoForCausalLM.from_pretrained(tmp_path), olmo.load_tokenizer(tmp_path)
    stops = sample.stop_tokens(tmp_path, model.config, tokenizer, True)
    outputs = []
    for keep_cache in (True, False):
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(MESSAGES) + "\n"))
        assert sample.converse(model, tokenizer, template, {}, None, 4096, 10, GREEDY, stops, None, keep_cache) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) >= 3


def test_conversation_keeps_an_interrupted_reply(tmp_path, monkeypatch, capsys):
    # Ctrl-C during a reply stops it; the partial reply stays in the history, and the conversation goes on
    e2e_checkpoint("olmo3", tmp_path, chat_template=CHATML)
    model, tokenizer = olmo.OlmoForCausalLM.from_pretrained(tmp_path), olmo.load_tokenizer(tmp_path)
    plain, histories = generate.generate, []

    def interrupted_after_3(*a, **k):
        for i, token in enumerate(plain(*a, **k)):
            if i == 3 and not histories[1:]:
                raise KeyboardInterrupt
            yield token
    monkeypatch.setattr(generate, "generate", interrupted_after_3)
    render = sample.render_chat
    monkeypatch.setattr(sample, "render_chat", lambda t, s, messages: histories.append(list(messages)) or render(t, s, messages))
    monkeypatch.setattr(sys, "stdin", io.StringIO("First\nSecond\n"))
    stops = sample.stop_tokens(tmp_path, model.config, tokenizer, True)
    assert sample.converse(model, tokenizer, CHATML, {}, None, 4096, 10, GREEDY, stops) == 0
    out, err = capsys.readouterr()
    assert "interrupted; " in err and len(histories) == 2
    partial = out.splitlines()[0]
    assert histories[1][:2] == [{"role": "user", "content": "First"}, {"role": "assistant", "content": partial}]
    assert len(tokenizer.encode(partial)) == 3


@pytest.mark.slow
def test_conversation_commands_and_a_full_context(tmp_path):
    e2e_checkpoint("olmo2", tmp_path, chat_template=TULU)
    common = ["--model", str(tmp_path), "--chat", "--temperature", "0", "--max-new-tokens", "8", "--dtype", "float32"]
    r = run_sample(*common, stdin="Hello\n/reset\nHello\n/system Be nice.\n\n/quit\nnot read\n")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert first == second and len(r.stdout.splitlines()) == 2  # /reset: the same first turn again; /quit ends
    assert "(a new conversation)" in r.stderr and "system message: 'Be nice.'" in r.stderr
    # the first turn is 13 tokens: its reply fills the remaining 5 of 18; the second turn does not fit
    r = run_sample(*common, "--max-context", "18", stdin="Hi\nHi again\n")
    assert r.returncode == 0, r.stderr
    assert "decode 5 tokens" in r.stderr and "(the context is full: /reset starts a new conversation)" in r.stderr
    assert "the context holds 18 (--max-context): /reset starts a new one" in r.stderr


@pytest.mark.slow
def test_conversation_in_a_terminal_ends_with_ctrl_d(tmp_path):
    import pty
    e2e_checkpoint("olmo2", tmp_path, chat_template=TULU)
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, str(Path(__file__).parent / "sample.py"), "--model", str(tmp_path), "--chat",
                          "--temperature", "0", "--max-new-tokens", "5", "--dtype", "float32"],
                         stdin=follower, stdout=follower, stderr=subprocess.PIPE, text=True)
    os.close(follower)
    seen = b""
    while seen.count(b"> ") < 1:  # the prompt, once the model is loaded
        seen += os.read(leader, 1024)
    os.write(leader, b"Hello\n")
    while seen.count(b"> ") < 2:  # the reply, then the prompt again
        seen += os.read(leader, 1024)
    os.write(leader, b"\x04")  # Ctrl-D
    assert p.wait(timeout=600) == 0
    assert "/reset starts a new conversation" in p.stderr.read()
    os.close(leader)


@pytest.mark.slow
def test_readme_first_command_runs_the_tiny_olmo_offline():
    # the first set-up command of README.md: the checkpoint that notebook 06 trains, in the repository
    readme = (Path(__file__).parent / "README.md").read_text()
    command = shlex.split(re.search(r"python sample.py --model notebooks/tiny_olmo [^\n]*", readme).group())
    r = subprocess.run([sys.executable, *command[1:]], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Return the") and len(r.stdout) > 40 and "decode" in r.stderr



def test_the_tiny_olmo_chat_template_renders_as_transformers_does():
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(TINY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A sequence."}, {"role": "user", "content": "And a tuple?"}]
    template, specials = sample.chat_template(TINY)
    text = sample.render_chat(template, specials, messages)
    assert text == ("Be brief.\n\nUser: What is a list?\n\nAssistant: A sequence.<|endoftext|>\n\n"
                    "User: And a tuple?\n\nAssistant: ")
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert sample.render_chat(template, specials, messages[1:2]) == "User: What is a list?\n\nAssistant: "
    tokenizer = olmo.load_tokenizer(TINY)
    ids = tokenizer.encode(text)
    assert ids == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    # the end-of-text token closes an assistant's turn, and a reply stops at it
    assert ids.count(256) == 1 and sample.stop_tokens(TINY, olmo.read_config(TINY), tokenizer, chat=True) == {256}


@pytest.mark.slow
def test_the_tiny_olmo_chats_offline():
    cmd = [sys.executable, str(Path(__file__).parent / "sample.py"), "--model", str(TINY), "--chat",
           "--temperature", "0"]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([*cmd, "--prompt", "Hi"], capture_output=True, text=True, env=offline, timeout=600)
    assert r.returncode == 0, r.stderr
    # "User: Hi\n\nAssistant: ", 21 bytes; the reply runs to --max-new-tokens (no end-of-text: see above)
    assert "prompt 21 tokens" in r.stderr and "decode 200 tokens" in r.stderr and len(r.stdout) > 100
    r = subprocess.run([*cmd, "--max-new-tokens", "20"], input="Hi\nWhat is a list?\n", capture_output=True, text=True,
                       env=offline, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("decode 20 tokens") == 2 and len(r.stdout.splitlines()) >= 2
