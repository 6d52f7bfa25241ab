"""The built-in models, datasets and setups by name, one line each.

Torch-free, so that `gradlab list`, `show` and `--help` answer without loading torch;
the factories themselves live in gradlab/zoo (zoo.MODELS and zoo.DATASETS pair each
name here with its factory, and a test keeps the two sets of names equal).
"""

MODELS = {
    "toy-linear": "one weight w = 1, prediction w*x (use with toy-pairs)",
    "mlp": "Linear-[norm]-ReLU-[dropout] x depth + Linear head; settings hidden, depth, "
           "norm, dropout",
    "cnn": "2 conv blocks (conv-norm-ReLU-pool-[dropout]) + Linear, 8x8 images; channels, "
           "norm, dropout",
    "gru-lm": "causal LM: byte embedding, one GRU layer, linear head (docstrings)",
    "transformer-lm": "causal LM: 2-layer, 2-head transformer, width 32 (docstrings)",
    "two-heads": "a trunk Linear-Tanh (hidden) shared by two tasks, a Linear head each; a "
                 "head whose task is absent from a batch sits it out (two-tasks)",
}

DATASETS = {
    "toy-pairs": "two one-example batches x=4 then x=2, target 2x (the classic toy)",
    "regression": "synthetic linear regression, 10 features, 1024 train / 256 test",
    "digits": "scikit-learn's 8x8 digit images, 10 classes, 1438 train / 359 test",
    "docstrings": "next-token prediction on stdlib docstrings, byte tokens, padded lengths "
                  "min_len..max_len, 1024 train / 256 test",
    "two-tasks": "two synthetic regression tasks on 10 features (task 1: 1 example in 8), the "
                 "task in an 11th column, 1024 train / 256 test",
}

# whole training setups (model, examples, loss) built in: --set setup=NAME
SETUPS = {
    "digit-views": "two augmented views of each digit, a shared mlp encoder (hidden, depth), "
                   "InfoNCE with in-batch negatives (temperature): a loss that couples the "
                   "batch",
}
