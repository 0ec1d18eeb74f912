"""The built-in task application: a recipe's `task:` section instead of a `script:` (SFT / PEFT with the Hugging
Face `Trainer`), run on every site as `python -m fl_plugins.tasks --recipe RECIPE.yaml`.

    spec.py        the `task:` schema, validated when the recipe loads (torch-free; recipe.py imports it);
                   dataspec.py: its data keys and the sites' own `data:`
    run.py         the two entry points: one site's federation, and the baselines after a run
    shares.py      every site's share of the data (its own file, or the same seeded split of task.data everywhere)
    datafiles.py   what a data path holds (jsonl, json, csv, parquet, save_to_disk, a folder) and its rows
    encoding.py    rows as token ids and labels: the loss mask, chat templates, packing; the character tokenizer
    training.py    the model (4-bit, gradient checkpointing), tokenizer, PEFT wrapping, collator and `Trainer`
    demo_data.py   demo data sets generated offline (sentiment.py: the financial-sentiment sentences)

Importing this package loads nothing: the modules import numpy, torch and transformers themselves.
"""
