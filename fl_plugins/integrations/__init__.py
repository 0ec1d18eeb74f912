"""Trainer integrations: thin translations of a trainer's hooks into the framework-neutral round driver.

- driver.py: everything federated (receive, load with a strict check, offer round 0, round boundaries, send, FedProx,
  evaluations and submissions); tasks.py: the task kinds and what each asks; peers.py: the other ranks' view
- budget.py: one round's budget and the round's progress, for every integration
- targets.py: model targets (what travels, under which names) and the strict key and shape check
- fedprox.py: FedProx's proximal term and its anchor, for any torch model; scaffold.py: SCAFFOLD's control variates
  at a site; corrections.py: both, applied after each optimizer step
- _torch.py: a torch module as the driver's model target; torch.distributed as its collective
- lightning.py: the Lightning callback and patch() (`lightning` and `pytorch_lightning` trainers)
- hf.py: the Hugging Face Trainer callback and patch(); hf_model.py: what of a transformers/PEFT model travels;
  hf_wrappers.py: the Trainer methods patch() wraps (create_scheduler and train, evaluate); hf_args.py: what is
  read from and set in the TrainingArguments
- face.py: receive / is_running / shutdown of the faces, routed through the driver
"""
