"""The schedule model, a tool beside the runtime: `sim` plays one layer's schedule on a rank's
resources, `profiles` holds the rates fitted to our runs, `python -m ep.model` predicts and
draws. The runtime never imports it."""
