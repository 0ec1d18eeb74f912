"""Swarm learning at a site: its weights sealed for other sites, and the round's fold when the aggregator picks it
(site.py). It sits above client/ and aggregator/ (it runs the aggregator's fold at the site); the client session
loads it when the aggregator says the job is a swarm. docs/swarm.md has the design."""
