"""Probing frozen ViT features: [cls], mean and selective aggregation (AbMILP) heads.

The science of the `probe` command, one concern per module: `datasets` (labelled image
sets), `features` (token extraction and the feature cache), `heads` (the aggregator
registry and the head bank), `train` (recipes and training the bank), `selection`
(hyper-parameter selection and the AbMILP-vs-[cls] maps). `attnscope.commands.probe`
runs the whole job; `attnscope probe` is its command line.
"""
