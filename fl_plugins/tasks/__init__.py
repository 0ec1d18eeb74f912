"""The built-in task application: a recipe's `task:` section instead of a `script:` (SFT / PEFT with the Hugging
Face `Trainer`), run on every site as `python -m fl_plugins.tasks --recipe RECIPE.yaml`.

    spec.py        the `task:` schema, validated when the recipe loads (torch-free; recipe.py imports it)
    run.py         the two entry points: one site's federation, and the baselines after a run
    shares.py      every site's share of the data (the same seeded split everywhere)
    training.py    the model, tokenizer, PEFT wrapping, datasets and `Trainer`
    demo_data.py   demo data sets generated offline (sentiment.py: the financial-sentiment sentences)

Importing this package loads nothing: the modules import numpy, torch and transformers themselves.
"""
