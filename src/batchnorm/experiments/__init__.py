"""The paper's experiments, one module per figure or table. Library code never imports these."""
