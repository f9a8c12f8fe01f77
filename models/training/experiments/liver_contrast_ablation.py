"""The ablation behind liver 0.3.0 (EVALUATION_NOTES.md): the same U-Net, loss and data with and without the
local-contrast channels, validation split only. A throwaway loop kept for provenance; `train.py --contrast 9,21
--loss mse --map-bias -2` is the product path and gives the same network.

    PYTHONPATH=models/training python models/training/experiments/liver_contrast_ablation.py \
        --csv DATA/train/liver/labels.csv --dog 2 --tag dog     # with (boxes 9 and 21)
    ... --dog 0 --tag nodog                                     # without
"""
import time, argparse, numpy as np, torch
from biomarker_training import data as D, tasks, nets, train as TR
from torch import nn
import torch.nn.functional as F
p=argparse.ArgumentParser()
p.add_argument('--dog',type=int,default=0); p.add_argument('--loss',default='mse'); p.add_argument('--bias',type=float,default=-2.0)
p.add_argument('--epochs',type=int,default=20); p.add_argument('--lr',type=float,default=3e-3); p.add_argument('--threads',type=int,default=1)
p.add_argument('--bs',type=int,default=8); p.add_argument('--widths',default='8,16,32,64'); p.add_argument('--tag',default='x')
p.add_argument('--sparsity',type=float,default=0.01); p.add_argument('--csv',required=True); p.add_argument('--out',default='.')
a=p.parse_args()
torch.set_num_threads(a.threads); TR._seed(1)
spec=tasks.get('liver')
cases=D.load_cases(a.csv,spec)
tr,va=TR.split(cases,0.1,1)
class Enc(nets.Encoder):
    def __init__(s,widths,size,extra):
        super().__init__(widths,size); s.extra=extra
        if extra: s.blocks[0]=nets._block(3+extra,widths[0])
    def forward(s,x):
        parts=[x,s.coords.expand(x.shape[0],-1,-1,-1)]
        if s.extra:
            for k in (9,21)[:s.extra]:
                parts.append((x-F.avg_pool2d(x,k,1,k//2,count_include_pad=False))*4)
        x=torch.cat(parts,1); skips=[]
        for i,b in enumerate(s.blocks):
            if i>0: x=s.pool(x)
            x=b(x); skips.append(x)
        return skips
net=nets.UNet(tuple(int(v) for v in a.widths.split(',')),spec.size)
net.encoder=Enc(net.encoder.widths,spec.size,a.dog)
net.head.bias.data.fill_(a.bias)
opt=torch.optim.AdamW(net.parameters(),lr=a.lr,weight_decay=1e-4)
b=TR.Batcher(tr,spec,a.bs,torch.device('cpu'),True)
spe=(len(tr)+a.bs-1)//a.bs
sched=torch.optim.lr_scheduler.OneCycleLR(opt,max_lr=a.lr,total_steps=a.epochs*spe,pct_start=0.15)
rng=np.random.default_rng(1); t0=time.time()
for ep in range(a.epochs):
    L=[]
    for x,w,seg,y in b.epoch(rng):
        pred,m=TR.forward_values(net,'localization',spec,x,w,seg,len(y))
        if a.loss=='mse': l=((pred-y)/10).pow(2).mean()
        elif a.loss=='huber': l=F.smooth_l1_loss(pred/10,y/10,beta=1.0)
        else: l=(pred-y).abs().mean()/10
        l=l+a.sparsity*m.mean()
        opt.zero_grad(); l.backward(); opt.step(); sched.step(); L.append(l.item())
    net.eval(); vm=TR.quick_val(net,'localization',spec,va); net.train()
    with torch.no_grad():
        mx=max(float(net(torch.from_numpy(c.x[:,None]).float()).max()) for c in va[:10])
    print(a.tag,ep+1,'loss %.4f'%np.mean(L),vm,'mapmax %.3f'%mx,'%ds'%(time.time()-t0),flush=True)
torch.save(net.state_dict(),f'{a.out}/{a.tag}.pt')
