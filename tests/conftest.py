import os

# No test may reach a model hub: a stray download must fail at once, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Python leaves SIGINT ignored when it starts with it ignored (a background job of a non-interactive shell, e.g.
# `bash .ci/run &`), and train_sae rightly keeps an ignored signal ignored: the Ctrl-C tests would then wait for an
# interrupt that never comes. The tests stand for a user at a terminal, so they get the default Ctrl-C behaviour.
import signal
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN: signal.signal(signal.SIGINT, signal.default_int_handler)
