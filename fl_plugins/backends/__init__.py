"""Where `fl-plugins run` runs the sites: its *backends* (issue 15).

    process.py    the default: one OS process per site on this machine (`python SCRIPT ARGS`, its own session)
    on_ray.py     `backend: {type: ray}` / `--backend ray`: every site runs on a Ray cluster, in an actor that holds
                  the resources the recipe asks per site (`num_cpus`, `num_gpus`, `memory`) and starts the same
                  `python SCRIPT ARGS` there; without `address` Ray starts here, bound to 127.0.0.1
    virtual.py    more sites than the cluster has room for: *virtual* sites, run in turns (below)
    spec.py       the recipe's `backend:` section

The runner (runner.py) sees a site as a `SiteRun`: a name, a log file in RUN_DIR/sites, an exit code once it ended
(`poll`), and `terminate` / `wait` / `kill` (`stop_sites` uses them in that order). The aggregator runs in the
runner's process whatever the backend; the sites get its address as FL_SERVER (and FL_KIT with `--tls`), so a
site's script cannot tell the backends apart.

A site on Ray: an actor (`SiteActor`, resources from the recipe) starts the site's process on the node Ray chose;
the runner polls it, appending what the process printed to RUN_DIR/sites/SITE.log, so a site on another node logs
where the run is. An actor that dies (its node lost, killed for memory) is a site that exited with an error: the
runner reports it with its log's tail, tells the aggregator it is gone (ending.site_exited: the round goes on by
its rules: closes with what it has, or a new attempt), and the job goes on while `min_sites` sites are left;
unlike the process backend, one failed site does not stop the run (a cluster loses workers).

Virtual sites (virtual.py): with more sites than the cluster can run at once (`slots`: what its CPUs and GPUs
hold at the recipe's per-site resources, or the recipe's `slots`), a site's process no longer lives for the whole
job; it runs one turn (FL_TURN=1: `is_running()` turns False once its TRAIN answer is sent, client/session.py)
and exits. The runner vouches for every virtual site between its turns (ending.vouch: the aggregator counts it
alive, so the round's sample is drawn over all of them with the same seed as if every site were connected, and
the round waits for each sampled site's turn) and starts the sampled sites of the current round and attempt, at
most `slots` at once, in the recipe's order (virtual.py's docstring has the rules). What a site
keeps between its turns: its data split and its seeds (a script derives them from FL_SITE, as every example does);
what it loses: anything it held in memory, like its optimizer's state (each turn builds it anew, as Flower's
simulation does). The final evaluation gives each site it asks one more turn. What virtual sites do not do: resend
a counted update after a refold (a new turn trains again), cross-site evaluation, evaluations between rounds,
SCAFFOLD, and a swarm (refused before anything runs). A turn that fails is reported like a failed site, and that
site sits out the attempt it ran for.
"""
