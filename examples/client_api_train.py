"""A site's training script in NVIDIA FLARE's client-API style: only the import line differs.

Each site generates its own data (a seeded, label-skewed share of a 3-class problem), trains a small MLP
for one local epoch per round, and sends its weights with the validation accuracy of the global model; at the
job's end it scores the final global model (an evaluation task: `flare.is_evaluate()`) without training. Its
training loss goes to the aggregator with `flare.log` at each global step (RUN_DIR/logs.jsonl, which the recipe's
`tracking:` trackers and `fl-plugins report` read).
Run by `fl-plugins run recipes/quickstart.yaml`, which sets FL_SERVER and FL_SITE for each site.
"""

import os

import torch
from torch import nn

import fl_plugins.client as flare  # was: import nvflare.client as flare


def make_data(site: int, n: int = 600):
    g = torch.Generator().manual_seed(1000 + site)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    # label skew: each site sees mostly one class
    probs = torch.full((3,), 0.15)
    probs[site % 3] = 0.7
    y = torch.multinomial(probs, n, replacement=True, generator=g)
    x = centers[y] + 0.9 * torch.randn(n, 2, generator=g)
    return x, y


def main() -> None:
    site = int(os.environ["FL_SITE"].rsplit("-", 1)[-1])
    x, y = make_data(site)
    xv, yv = make_data(99, 300)  # a shared validation set, also generated
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))
    flare.init()
    global_step = 0
    while flare.is_running():
        input_model = flare.receive()
        net.load_state_dict(input_model.params)
        with torch.no_grad():
            val_acc = (net(xv).argmax(1) == yv).float().mean().item()
        if flare.is_evaluate():  # the job's end: the final global model is scored, not trained
            print(f"[{flare.get_site_name()}] final global model val_acc={val_acc:.3f}", flush=True)
            flare.send(flare.FLModel(metrics={"val_acc": val_acc}))
            continue
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        steps = 0
        for i in range(0, len(x), 32):
            loss = nn.functional.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            global_step += 1
            flare.log("train_loss", loss.item(), "SCALAR", step=global_step)
        print(f"[{flare.get_site_name()}] round {input_model.current_round}: global model val_acc={val_acc:.3f}, "
              f"local loss={loss.item():.3f}", flush=True)  # fmt: skip
        flare.send(flare.FLModel(params=net.state_dict(), metrics={"val_acc": val_acc},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))  # fmt: skip


if __name__ == "__main__":
    main()
