# The rows of the lr 3e-3 ruler (issue 19), in the order the chain runs them: sourced by
# continue_ruler.sh (which runs them) and finish_ruler.sh (which checks that each has its cells).
RULER_METHODS=seq,regmean,kif-element,magmax,linear-0.5,ties,kif,dare,mtl,linear-0.3,linear-0.7,replay,kif-adaptive-rank
