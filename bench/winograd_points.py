#!/usr/bin/env python3
"""Rounding error of Winograd F(m x m, 3x3) in float32 for several sets of interpolation points.

Builds the Toom-Cook matrices (A^T, G, B^T) from the points (plus infinity) with exact fractions,
checks the 1-D identity, then computes 2-D correlations of random 6x6 (or 4x4) tiles of 64
channels in [-1, 1] in float32 and float64 and prints the mean and largest absolute error of the
float32 result against the float64 direct correlation. The figures in crates/nn/README.md
(F(4x4, 3x3) against F(2x2, 3x3)) come from:

    python3 bench/winograd_points.py
"""
import torch
from fractions import Fraction as F
torch.manual_seed(0)
def mats(pts, m, r):
    n = m + r - 1
    assert len(pts) == n - 1
    A = [[F(p)**i for i in range(m)] for p in pts] + [[F(0)]*(m-1)+[F(1)]]
    G = []
    for j,p in enumerate(pts):
        N = F(1)
        for l,q in enumerate(pts):
            if l!=j: N *= (F(p)-F(q))
        G.append([F(p)**k / N for k in range(r)])
    G.append([F(0)]*(r-1)+[F(1)])
    # C columns: coeffs of prod_{l!=j}(x-p_l), and M(x)
    def poly(roots):
        c=[F(1)]
        for q in roots:
            nc=[F(0)]*(len(c)+1)
            for i,v in enumerate(c):
                nc[i+1]+=v; nc[i]-=F(q)*v
            c=nc
        return c  # coeffs low->high
    cols=[]
    for j in range(n-1):
        c=poly([q for l,q in enumerate(pts) if l!=j]); cols.append(c+[F(0)]*(n-len(c)))
    c=poly(pts); cols.append(c)
    C=[[cols[j][i] for j in range(n)] for i in range(n)]  # C[i][j]
    return A,G,C
def tens(M,dt): return torch.tensor([[float(x) for x in row] for row in M],dtype=dt)
def check(pts,m=4,r=3):
    A,G,C=mats(pts,m,r); n=m+r-1
    A64,G64,C64=tens(A,torch.float64),tens(G,torch.float64),tens(C,torch.float64)
    # linear conv s = C[(G g) * (A h)] ; correlation y = A^T[(G g) * (C^T d)]
    g=torch.randn(r,dtype=torch.float64); d=torch.randn(n,dtype=torch.float64)
    y=A64.T@((G64@g)*(C64.T@d))
    want=torch.stack([sum(g[k]*d[i+k] for k in range(r)) for i in range(m)])
    return (y-want).abs().max().item(), (A,G,C)
def err2d(pts, cin=64, trials=2000, m=4, r=3):
    e,(A,G,C)=check(pts,m,r); n=m+r-1
    assert e<1e-9, (pts,e)
    res=[]
    for dt in (torch.float32,torch.float64):
        At,Gt,Bt=tens(A,dt).T,tens(G,dt),tens(C,dt).T
        res.append((At,Gt,Bt))
    d=torch.rand(trials,cin,n,n,dtype=torch.float64)*2-1
    g=torch.rand(trials,cin,r,r,dtype=torch.float64)*2-1
    out=[]
    for (At,Gt,Bt),dt in zip(res,(torch.float32,torch.float64)):
        dd=d.to(dt); gg=g.to(dt)
        U=Gt@gg@Gt.T; V=Bt@dd@Bt.T
        M=(U*V).sum(1)
        out.append(At@M@At.T)
    # direct
    want=torch.zeros(trials,m,m,dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            want[:,i,j]=(d[:,:,i:i+r,j:j+r]*g).sum((1,2,3))
    assert (out[1]-want).abs().max()<1e-9
    return ((out[0].double()-want).abs().mean().item(), (out[0].double()-want).abs().max().item())
POINT_SETS = [
    [0, 1, -1, 2, -2],
    [0, 1, -1, F(1, 2), F(-1, 2)],
    [0, 1, -1, F(1, 2), -2],
    [0, -1, 1, F(-1, 2), 2],
    [0, F(1, 2), F(-1, 2), 2, -2],
    [0, 1, -1, F(3, 2), F(-3, 2)],
    [0, 1, -1, F(2, 3), F(-2, 3)],
]

if __name__ == "__main__":
    print("scheme      points                 mean |error|  max |error|")
    for pts in POINT_SETS:
        mean, worst = err2d(pts)
        print(f"F(4x4, 3x3) {', '.join(str(p) for p in pts):22} {mean:.2e}      {worst:.2e}")
    mean, worst = err2d([0, 1, -1], m=2)
    print(f"F(2x2, 3x3) {'0, 1, -1':22} {mean:.2e}      {worst:.2e}")
