"""Analyses from the AoE paper: router-free expert selection in a pretrained routed MoE (Section 3.1, Table 1),
the Appendix B toy study."""
