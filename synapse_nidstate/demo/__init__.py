"""The demo (``synapse-nidstate demo``) and what it, the benchmarks and the tests
share: a real Synapse in this process (``inprocess``), realistic histories
written through Synapse's handlers (``history``), lookup timings (``timing``)."""
