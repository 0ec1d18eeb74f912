"""Trainer integrations: thin translations of a trainer's hooks into the framework-neutral round driver.

- driver.py: the federation logic (receive, load with a strict check, offer round 0, round budget, send)
- _torch.py: a torch module as the driver's model target (state_dict in, load in place)
- lightning.py: the Lightning callback over the driver (`lightning` and `pytorch_lightning` trainers)
"""
